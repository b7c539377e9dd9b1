// A user's own image, end to end: pushed to a real registry (Debian's docker-registry on
// loopback), pulled through the API, booted as a real guest (QEMU, TCG here). The guest reports
// on its console what it sees — files after whiteouts, env, working directory, entrypoint and
// arguments, user — and the test reads that back through the logs.
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { push, startRegistry, type TestRegistry } from "../../host-agent/testing/registry.ts";
import { busyboxEntries, dir, file, writeLayout } from "../../scripts/oci-layout.ts";
import { ensureVmAssets } from "../../scripts/vm-assets.ts";
import { api, hypeman, seedTenant, waitFor } from "../harness.ts";
import { killStackGuests, qemuAgentEnv, type Stack, startStack } from "./env.ts";

const REPORT = `#!/bin/sh
echo "REPORT args=$* pwd=$(pwd) uid=$(id -u) gid=$(id -g) mode=$MODE path=$PATH"
echo "REPORT etc=$(ls /etc | tr '\\n' ' ')"
echo "REPORT data=$(ls /srv/data | tr '\\n' ' ')"
echo "REPORT done"
exec sleep 3600
`;

describe("a pulled image booted as a real guest", { timeout: 300_000 }, () => {
  let stack: Stack;
  let reg: TestRegistry;
  let client: ReturnType<typeof hypeman>;
  const work = mkdtempSync(path.join(os.tmpdir(), "images-qemu-"));

  beforeAll(async () => {
    await ensureVmAssets();
    reg = await startRegistry();
    stack = await startStack({
      cpEnv: { COMMAND_TIMEOUT_MS: "120000" },
      agents: [qemuAgentEnv()],
    });
    client = hypeman(stack.cp.url, stack.apiKey);
  }, 300_000);

  afterAll(async () => {
    killStackGuests(stack);
    await reg?.stop();
    rmSync(work, { recursive: true, force: true });
  });

  const report = async (name: string) => {
    const lines: string[] = [];
    for await (const line of await client.instances.logs(name, { tail: 10_000 })) {
      const m = /REPORT (.*)$/.exec(line.trim());
      if (m?.[1]) lines.push(m[1]);
    }
    return lines;
  };

  it("runs the image's entrypoint with its env, working directory and user, on its files", async () => {
    const layout = path.join(work, "app");
    writeLayout(layout, {
      layers: [
        { entries: busyboxEntries() },
        {
          compression: "zstd",
          entries: [
            file("etc/motd", "gone\n"),
            dir("srv"),
            dir("srv/data", 0o777),
            file("srv/data/old", "old\n"),
            dir("app", 0o777),
            file("app/report", REPORT, 0o755),
          ],
        },
        {
          entries: [
            file("etc/.wh.motd", ""),
            file("srv/data/.wh..wh..opq", ""),
            file("srv/data/new", "new\n"),
          ],
        },
      ],
      config: {
        Entrypoint: ["/app/report"],
        Cmd: ["from-image"],
        Env: ["PATH=/bin", "MODE=image"],
        WorkingDir: "/app",
        User: "app",
      },
    });
    const name = `${reg.host}/users/app:v1`;
    await push(layout, name, reg.user);
    await client.images.create({ name });
    const ready = await waitFor(
      async () => {
        const i = await client.images.get(name);
        return i.status === "ready" || i.status === "failed" ? i : undefined;
      },
      { timeoutMs: 60_000, what: "the pull" },
    );
    expect(ready).toMatchObject({ status: "ready", error: null });

    const vm = await client.instances.create({
      name: "users-app",
      image: name,
      size: "256MB",
      vcpus: 1,
      env: { MODE: "instance" },
    });
    expect(vm.state).toBe("Running");
    const lines = await waitFor(
      async () => {
        const r = await report("users-app");
        return r.includes("done") ? r : undefined;
      },
      { timeoutMs: 60_000, what: "the guest's report" },
    );
    expect(lines).toContain("args=from-image pwd=/app uid=1000 gid=1000 mode=instance path=/bin");
    // motd whited out; /srv/data's old file hidden by the opaque directory.
    expect(lines).toContain("etc=group passwd");
    expect(lines).toContain("data=new");

    // Another tenant cannot boot it by name: it is not theirs, and no host imported it.
    const other = await seedTenant(stack.db);
    const refused = await api(stack.cp.url, other.apiKey)("POST", "/instances", {
      name: "borrowed",
      image: name,
    });
    expect(refused).toMatchObject({ status: 404, body: { code: "not_found" } });
  });
});
