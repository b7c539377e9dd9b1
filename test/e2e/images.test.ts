// Images pulled through the API from a real registry (Debian's docker-registry on loopback,
// token auth), by real agent processes (sim driver: the pull, the layer cache and the rootfs
// are the real ones; only guests are simulated) under a real control plane. What a guest sees
// of a pulled image is in images-qemu.test.ts.
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import type { Image } from "@onkernel/hypeman/resources/images";
import { eq } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { hosts, images, instances } from "../../control-plane/src/db/schema/index.ts";
import { push, startRegistry, type TestRegistry } from "../../host-agent/testing/registry.ts";
import { busyboxEntries, file, writeLayout } from "../../scripts/oci-layout.ts";
import { api, hypeman, seedTenant, waitFor } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

describe("images pulled from a registry", { timeout: 120_000 }, () => {
  let stack: Stack;
  let reg: TestRegistry;
  let client: ReturnType<typeof hypeman>;
  let call: ReturnType<typeof api>;
  const work = mkdtempSync(path.join(os.tmpdir(), "images-e2e-"));
  let n = 0;

  async function pushed(repoTag: string, layers = [{ entries: busyboxEntries() }], config = {}) {
    const layout = path.join(work, `layout-${n++}`);
    const written = writeLayout(layout, { layers, config });
    await push(layout, `${reg.host}/${repoTag}`, reg.user);
    return written;
  }

  const settled = (name: string, c = client) =>
    waitFor(
      async () => {
        const i = await c.images.get(name);
        return i.status === "ready" || i.status === "failed" ? i : undefined;
      },
      { timeoutMs: 60_000, what: `image ${name} to settle` },
    );

  beforeAll(async () => {
    reg = await startRegistry({ private: ["secret/app"] });
    stack = await startStack({
      // One pull at a time per host, so the queue is visible; a hung registry outlasts a test.
      // The first host has more memory: placement by free memory alone would always pick it.
      agents: ["8GB", "4GB"].map((memory) => ({
        AGENT_MEMORY: memory,
        AGENT_PULL_CONCURRENCY: "1",
        AGENT_REGISTRY_TIMEOUT_MS: "120000",
      })),
    });
    client = hypeman(stack.cp.url, stack.apiKey);
    call = api(stack.cp.url, stack.apiKey);
  }, 120_000);
  afterAll(async () => {
    await reg?.stop();
    rmSync(work, { recursive: true, force: true });
  });

  it("pulls: 202 pending, then ready with the config; an instance is created from it", async () => {
    const image = await pushed("public/app:v1", undefined, {
      Entrypoint: ["/bin/sh", "-c"],
      Cmd: ["echo hi"],
      Env: ["PATH=/bin", "MODE=test"],
      WorkingDir: "/srv",
    });
    const name = `${reg.host}/public/app:v1`;
    const res = await call("POST", "/images", { name, tags: { team: "a" } });
    expect(res.status).toBe(202);
    expect(res.body).toMatchObject({
      name,
      status: expect.stringMatching(/pending|pulling|converting|ready/),
    });
    const ready = await settled(name);
    expect(ready).toMatchObject({
      name,
      status: "ready",
      digest: image.digest,
      platform: "linux/amd64",
      entrypoint: ["/bin/sh", "-c"],
      cmd: ["echo hi"],
      env: { PATH: "/bin", MODE: "test" },
      working_dir: "/srv",
      tags: { team: "a" },
      error: null,
      queue_position: null,
    });
    expect(ready.size_bytes).toBeGreaterThan(0);
    expect((await client.images.list()).map((i: Image) => i.name)).toContain(name);
    expect(await call("GET", "/images?tags[team]=b")).toMatchObject({ status: 200, body: [] });

    const inst = await client.instances.create({ name: "from-pull", image: name });
    expect(inst).toMatchObject({ image: name, state: "Running" });
    // In use: not deletable; gone with its instance.
    const busy = await call("DELETE", `/images/${encodeURIComponent(name)}`);
    expect(busy).toMatchObject({ status: 409, body: { code: "conflict" } });
    expect((busy.body as { message: string }).message).toContain("from-pull");
    await client.instances.delete("from-pull");
    expect((await call("DELETE", `/images/${encodeURIComponent(name)}`)).status).toBe(204);
    expect((await call("GET", `/images/${encodeURIComponent(name)}`)).status).toBe(404);
  });

  it("says what went wrong: a bad reference at once, a registry's 404 and 401 as failed", async () => {
    const bad = await call("POST", "/images", { name: "Not A Reference!" });
    expect(bad).toMatchObject({ status: 400, body: { code: "invalid_request" } });
    expect(await call("POST", "/images", { name: "busybox", platform: "windows" })).toMatchObject({
      status: 400,
      body: { code: "invalid_platform" },
    });
    expect((await call("GET", "/images")).body).not.toContainEqual(
      expect.objectContaining({ name: "Not A Reference!" }),
    );

    const missing = `${reg.host}/public/app:does-not-exist`;
    await client.images.create({ name: missing });
    const failed = await settled(missing);
    expect(failed.status).toBe("failed");
    expect(failed.error).toMatch(/not found in the registry \(404/);
    // An instance of an image that is not ready: Hypeman's 400 image_not_ready.
    const refused = await call("POST", "/instances", { name: "nope", image: missing });
    expect(refused).toMatchObject({ status: 400, body: { code: "image_not_ready" } });

    await pushed("secret/app:v1");
    const secret = `${reg.host}/secret/app:v1`;
    await client.images.create({ name: secret });
    expect((await settled(secret)).error).toMatch(/requires credentials for secret\/app \(401\)/);
    await client.images.create({
      name: secret,
      credentials: { username: reg.user.username, password: "wrong" },
    });
    expect((await settled(secret)).error).toMatch(/refused the credentials/);
    // The same name pulled again with the right credentials: ready.
    await client.images.create({ name: secret, credentials: reg.user });
    expect(await settled(secret)).toMatchObject({ status: "ready", error: null });
  });

  it("keeps each tenant's images, names and credentials to itself", async () => {
    await pushed("public/mine:v1");
    const name = `${reg.host}/public/mine:v1`;
    await client.images.create({ name });
    await settled(name);
    const other = await seedTenant(stack.db);
    const theirs = hypeman(stack.cp.url, other.apiKey);
    const otherCall = api(stack.cp.url, other.apiKey);
    expect((await theirs.images.list()).map((i: Image) => i.name)).not.toContain(name);
    expect((await otherCall("GET", `/images/${encodeURIComponent(name)}`)).status).toBe(404);
    expect((await otherCall("DELETE", `/images/${encodeURIComponent(name)}`)).status).toBe(404);
    // Their own pull of the same name is theirs, and the first tenant's stays ready.
    await theirs.images.create({ name });
    expect((await settled(name, theirs)).status).toBe("ready");
    expect((await client.images.get(name)).status).toBe("ready");
  });

  it("queues pulls, joins a pull in flight, and refuses to join it with other credentials", async () => {
    const names = ["q1", "q2", "q3"].map((q) => `${reg.host}/public/${q}:v1`);
    for (const q of ["q1", "q2", "q3"]) await pushed(`public/${q}:v1`, [{ entries: [file(q, q)] }]);
    const [first, second, third] = names as [string, string, string];
    const image = (name: string) => client.images.get(name);
    // The registry hangs: pulls stay in flight while the queue is looked at.
    reg.signal("SIGSTOP");
    try {
      expect((await call("POST", "/images", { name: first, credentials: reg.user })).status).toBe(
        202,
      );
      expect((await call("POST", "/images", { name: second })).status).toBe(202);
      // One pull at a time per host, two hosts: both start, the third waits its turn.
      await waitFor(
        async () =>
          (await image(first)).status === "pulling" && (await image(second)).status === "pulling",
        { timeoutMs: 30_000, what: "two pulls to start" },
      );
      expect((await call("POST", "/images", { name: third })).status).toBe(202);
      expect(await image(third)).toMatchObject({ status: "pending", queue_position: 1 });
      expect((await image(first)).queue_position).toBeNull();
      // The same name, other credentials: 409; the same credentials: joined, 202.
      const clash = await call("POST", "/images", {
        name: first,
        credentials: { username: reg.user.username, password: "other" },
      });
      expect(clash).toMatchObject({ status: 409, body: { code: "conflict" } });
      expect(await call("POST", "/images", { name: first, credentials: reg.user })).toMatchObject({
        status: 202,
        body: { status: "pulling" },
      });
    } finally {
      reg.signal("SIGCONT");
    }
    for (const name of names) expect((await settled(name)).status).toBe("ready");
  });

  it("starts a pull again elsewhere when the host it was on is gone, and ignores the old one's answer", async () => {
    const name = `${reg.host}/public/moved:v1`;
    await pushed("public/moved:v1", [{ entries: [file("moved", "m")] }]);
    const row = async () => {
      const [r] = await stack.db.select().from(images).where(eq(images.name, name));
      return r;
    };
    reg.signal("SIGSTOP");
    let first: string | null | undefined;
    try {
      expect((await call("POST", "/images", { name })).status).toBe(202);
      const before = await row();
      first = before?.hostId;
      expect(first).toBeTruthy();
      // Its host drops out (as a lost agent would be marked): asked again, the pull moves.
      await stack.db
        .update(hosts)
        .set({ status: "offline" })
        .where(eq(hosts.id, first as string));
      expect((await call("POST", "/images", { name })).status).toBe(202);
      const after = await row();
      expect(after?.hostId).not.toBe(first);
      expect(after?.operationId).not.toBe(before?.operationId);
    } finally {
      if (first) await stack.db.update(hosts).set({ status: "online" }).where(eq(hosts.id, first));
      reg.signal("SIGCONT");
    }
    const ready = await settled(name);
    expect(ready.status).toBe("ready");
    // The first pull ran to its end too: its host holds the image, and the row still names the
    // second pull, whichever answered last.
    await waitFor(
      async () => {
        const [h] = await stack.db
          .select()
          .from(hosts)
          .where(eq(hosts.id, first as string));
        return h?.imageDigests.includes(ready.digest) ? h : undefined;
      },
      { timeoutMs: 30_000, what: "the first host to hold the image" },
    );
    const last = await row();
    expect(last?.hostId).not.toBe(first);
    expect(last?.status).toBe("ready");
  });

  it("places an instance on a host that holds its image, before one with more room", async () => {
    const busy = `${reg.host}/public/busy:v1`;
    const mine = `${reg.host}/public/placed:v1`;
    await pushed("public/busy:v1", [{ entries: [file("busy", "b")] }]);
    await pushed("public/placed:v1", [{ entries: [file("placed", "p")] }]);
    const hostOf = async (name: string) =>
      (await stack.db.select().from(images).where(eq(images.name, name)))[0]?.hostId;
    // The big host takes the first pull (it has the most memory) and is kept busy with it, so
    // the second goes to the small host.
    reg.signal("SIGSTOP");
    try {
      await call("POST", "/images", { name: busy });
      await call("POST", "/images", { name: mine });
    } finally {
      reg.signal("SIGCONT");
    }
    const [big, small] = stack.hostIds;
    expect(await hostOf(busy)).toBe(big);
    expect(await hostOf(mine)).toBe(small);
    expect((await settled(mine)).status).toBe("ready");
    const inst = await client.instances.create({ name: "placed-1", image: mine, size: "1GB" });
    const [row] = await stack.db.select().from(instances).where(eq(instances.id, inst.id));
    expect(row?.hostId).toBe(small);
    await client.instances.delete("placed-1");
    expect((await settled(busy)).status).toBe("ready");
  });
});
