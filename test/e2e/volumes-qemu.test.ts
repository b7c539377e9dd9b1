// Volumes in real guests (QEMU, TCG here): data written to a writable volume outlives its
// instance and is read by the next; read-only attachments share it; an overlay's writes go with
// their instance; a fork of a guest with a read-only volume sees the same files.
import type { InstanceCreateParams } from "@onkernel/hypeman/resources/instances/instances";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_IMAGE } from "../../scripts/oci-image.ts";
import { ensureVmAssets } from "../../scripts/vm-assets.ts";
import { api, hypeman, waitFor } from "../harness.ts";
import { killStackGuests, qemuAgentEnv, type Stack, startStack } from "./env.ts";

describe("volumes in real guests", { timeout: 600_000 }, () => {
  let stack: Stack;
  let client: ReturnType<typeof hypeman>;
  let call: ReturnType<typeof api>;

  beforeAll(async () => {
    await ensureVmAssets();
    stack = await startStack({ cpEnv: { COMMAND_TIMEOUT_MS: "120000" }, agents: [qemuAgentEnv()] });
    client = hypeman(stack.cp.url, stack.apiKey);
    call = api(stack.cp.url, stack.apiKey);
  }, 300_000);

  afterAll(() => killStackGuests(stack));

  /** The guest's `VOL …` console lines so far. */
  const said = async (name: string) => {
    const lines: string[] = [];
    for await (const line of await client.instances.logs(name, { tail: 10_000 })) {
      const m = /VOL (.*)$/.exec(line.trim());
      if (m?.[1]) lines.push(m[1]);
    }
    return lines;
  };
  const saysSoon = (name: string, re: RegExp) =>
    waitFor(async () => (await said(name)).find((l) => re.test(l)), {
      timeoutMs: 60_000,
      what: `${name} to say ${re}`,
    });
  const boot = (name: string, volumes: InstanceCreateParams["volumes"], script: string) =>
    client.instances.create({
      name,
      image: TEST_IMAGE,
      size: "256MB",
      vcpus: 1,
      volumes,
      cmd: ["sh", "-c", script],
    });
  const READ =
    'while :; do echo "VOL read $(cat /data/file) $(ls /data | tr "\\n" " ")"; sleep 1; done';

  it("keeps a writable volume's data for the next instance; shares it read-only; forks see it", async () => {
    expect(
      (await call("POST", "/volumes", { id: "vol-data", name: "data", size_gb: 1 })).status,
    ).toBe(201);
    await boot(
      "writer",
      [{ volume_id: "vol-data", mount_path: "/data" }],
      'echo hello > /data/file && sync && echo "VOL wrote"; exec sleep 3600',
    );
    await saysSoon("writer", /^wrote$/);
    // A writable volume cannot be in two instances: its fork is refused, naming it.
    const fork = await call("POST", "/instances/writer/fork", {
      name: "writer-f",
      from_running: true,
    });
    expect(fork).toMatchObject({ status: 409, body: { code: "conflict" } });
    expect((fork.body as { message: string }).message).toContain("vol-data");
    await client.instances.delete("writer");

    for (const name of ["reader-1", "reader-2"]) {
      await boot(name, [{ volume_id: "vol-data", mount_path: "/data", readonly: true }], READ);
    }
    for (const name of ["reader-1", "reader-2"]) {
      expect(await saysSoon(name, /^read hello /)).toBe("read hello file lost+found");
    }
    const vol = (await call("GET", "/volumes/vol-data")).body as { attachments: unknown[] };
    expect(vol.attachments).toHaveLength(2);
    expect((await call("DELETE", "/volumes/vol-data")).status).toBe(409);

    // A fork of a guest with a read-only volume keeps it, and reads what its source reads.
    const f = await client.instances.fork("reader-1", { name: "reader-1-f", from_running: true });
    expect(f.state).toBe("Running");
    const before = (await said("reader-1-f")).length;
    await waitFor(async () => (await said("reader-1-f")).length > before, {
      timeoutMs: 60_000,
      what: "the fork to read again",
    });
    expect((await said("reader-1-f")).at(-1)).toBe("read hello file lost+found");
    for (const name of ["reader-1", "reader-2", "reader-1-f"]) await client.instances.delete(name);
  });

  it("keeps an overlay's writes with their instance, the volume untouched", async () => {
    await boot(
      "overlaid",
      [
        {
          volume_id: "vol-data",
          mount_path: "/data",
          readonly: true,
          overlay: true,
          overlay_size: "64MB",
        },
      ],
      'echo mine > /data/file2 && echo "VOL overlay $(ls /data | tr "\\n" " ")"; exec sleep 3600',
    );
    expect(await saysSoon("overlaid", /^overlay /)).toBe("overlay file file2 lost+found");
    await client.instances.delete("overlaid");
    await boot("after", [{ volume_id: "vol-data", mount_path: "/data", readonly: true }], READ);
    expect(await saysSoon("after", /^read /)).toBe("read hello file lost+found");
    await client.instances.delete("after");
    expect((await call("DELETE", "/volumes/vol-data")).status).toBe(204);
  });
});
