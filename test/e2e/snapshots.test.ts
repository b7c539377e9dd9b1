import { APIError, ConflictError, NotFoundError } from "@onkernel/hypeman";
import { beforeAll, describe, expect, it } from "vitest";
import { hypeman, seedTenant, waitFor } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

// Snapshots through the official client, unmodified, against real processes (control plane,
// sim agent over its WebSocket, Postgres server): capture of each kind, list filters, fork to
// each target state, restore, delete while forks run, and the source's delete.
describe("snapshots through the official client", () => {
  let stack: Stack;
  let client: ReturnType<typeof hypeman>;
  beforeAll(async () => {
    stack = await startStack();
    client = hypeman(stack.cp.url, stack.apiKey);
  });

  const create = (name: string) =>
    client.instances.create({ name, image: "alpine", vcpus: 1, size: "256MB" });

  it("captures Standby snapshots of Running and Standby instances and a Stopped one of a Stopped instance", async () => {
    const web = await create("snap-web");
    const live = await client.instances.snapshots.create(web.id, {
      kind: "Standby",
      name: "live",
      tags: { team: "a" },
    });
    expect(live).toMatchObject({
      kind: "Standby",
      name: "live",
      tags: { team: "a" },
      source_instance_id: web.id,
      source_instance_name: "snap-web",
      source_hypervisor: "qemu",
      compression_state: "none",
    });
    expect(live.id).toMatch(/^[a-z0-9]{24}$/);
    expect(live.size_bytes).toBeGreaterThan(0);
    // Paused for the capture only: it runs again.
    expect((await client.instances.get(web.id)).state).toBe("Running");

    await client.instances.standby(web.id);
    const parked = await client.instances.snapshots.create(web.id, { kind: "Standby" });
    expect(parked.name ?? null).toBeNull();
    expect((await client.instances.get(web.id)).state).toBe("Standby");

    // A Stopped snapshot needs a Stopped source; a Standby one cannot be of a Stopped one.
    await expect(
      client.instances.snapshots.create(web.id, { kind: "Stopped" }),
    ).rejects.toBeInstanceOf(ConflictError);
    await client.instances.restore(web.id);
    await client.instances.stop(web.id);
    await expect(
      client.instances.snapshots.create(web.id, { kind: "Standby" }),
    ).rejects.toBeInstanceOf(ConflictError);
    const disk = await client.instances.snapshots.create(web.id, {
      kind: "Stopped",
      name: "disk",
      tags: { team: "b" },
    });
    expect(disk.kind).toBe("Stopped");
    // Names are unique per source instance.
    await expect(
      client.instances.snapshots.create(web.id, { kind: "Stopped", name: "disk" }),
    ).rejects.toBeInstanceOf(ConflictError);

    // Listing and its filters.
    const mine = await client.snapshots.list({ source_instance_id: web.id });
    expect(mine.map((s) => s.id)).toEqual([live.id, parked.id, disk.id]);
    expect((await client.snapshots.list({ kind: "Stopped" })).map((s) => s.id)).toEqual([disk.id]);
    expect((await client.snapshots.list({ name: "live" })).map((s) => s.id)).toEqual([live.id]);
    expect((await client.snapshots.list({ tags: { team: "b" } })).map((s) => s.id)).toEqual([
      disk.id,
    ]);
    expect((await client.snapshots.get(live.id)).name).toBe("live");
    await expect(client.snapshots.get("nosuchsnapshot00000000000")).rejects.toBeInstanceOf(
      NotFoundError,
    );
  });

  it("forks a snapshot to each target state, by its kind's default, with a fresh identity", async () => {
    const src = await create("fork-src");
    const snap = await client.instances.snapshots.create(src.id, { kind: "Standby" });
    const running = await client.snapshots.fork(snap.id, { name: "from-snap-1" });
    expect(running.state).toBe("Running");
    expect(running.id).not.toBe(src.id);
    expect(running.network?.mac).not.toBe(src.network?.mac);
    expect(running.network?.ip).not.toBe(src.network?.ip);
    const standby = await client.snapshots.fork(snap.id, {
      name: "from-snap-2",
      target_state: "Standby",
    });
    expect(standby.state).toBe("Standby");
    const stopped = await client.snapshots.fork(snap.id, {
      name: "from-snap-3",
      target_state: "Stopped",
    });
    expect(stopped.state).toBe("Stopped");
    await expect(client.snapshots.fork(snap.id, { name: "from-snap-1" })).rejects.toBeInstanceOf(
      ConflictError,
    );
    const wrong = await client.snapshots
      .fork(snap.id, { name: "from-snap-4", target_hypervisor: "firecracker" })
      .catch((e: unknown) => e);
    expect(wrong).toBeInstanceOf(APIError);
    expect((wrong as APIError).status).toBe(501);

    await client.instances.stop(src.id);
    const disk = await client.instances.snapshots.create(src.id, { kind: "Stopped" });
    // A Stopped snapshot forks to Stopped unless asked otherwise.
    expect((await client.snapshots.fork(disk.id, { name: "from-disk-1" })).state).toBe("Stopped");
    expect(
      (await client.snapshots.fork(disk.id, { name: "from-disk-2", target_state: "Running" }))
        .state,
    ).toBe("Running");
  });

  it("restores an instance to its snapshot, not while Running, and not another instance's", async () => {
    const a = await create("restore-a");
    const b = await create("restore-b");
    const snap = await client.instances.snapshots.create(a.id, { kind: "Standby" });
    await expect(client.instances.snapshots.restore(snap.id, { id: a.id })).rejects.toBeInstanceOf(
      ConflictError,
    );
    await client.instances.stop(a.id);
    const back = await client.instances.snapshots.restore(snap.id, { id: a.id });
    expect(back).toMatchObject({ id: a.id, name: "restore-a", state: "Running" });
    expect(back.network?.ip).toBe(a.network?.ip);
    await client.instances.stop(a.id);
    expect(
      (await client.instances.snapshots.restore(snap.id, { id: a.id, target_state: "Standby" }))
        .state,
    ).toBe("Standby");
    await client.instances.stop(b.id);
    const other = await client.instances.snapshots
      .restore(snap.id, { id: b.id })
      .catch((e: unknown) => e);
    expect((other as APIError).status).toBe(400);
  });

  it("keeps forks working after their snapshot and their source are deleted", async () => {
    const src = await create("gone-src");
    const snap = await client.instances.snapshots.create(src.id, { kind: "Standby" });
    const fork = await client.snapshots.fork(snap.id, { name: "gone-fork" });
    // A fork of a snapshot names the snapshot's source as where it came from.
    expect((fork as { forked_from?: string | null }).forked_from).toBe(src.id);
    await client.instances.delete(src.id);
    // The snapshot outlives its source: it is still listed and forkable.
    const second = await client.snapshots.fork(snap.id, { name: "gone-fork-2" });
    expect(second.state).toBe("Running");
    await client.snapshots.delete(snap.id);
    await expect(client.snapshots.get(snap.id)).rejects.toBeInstanceOf(NotFoundError);
    await expect(client.snapshots.fork(snap.id, { name: "gone-fork-3" })).rejects.toBeInstanceOf(
      NotFoundError,
    );
    expect((await client.instances.standby(fork.id)).state).toBe("Standby");
    expect((await client.instances.restore(fork.id)).state).toBe("Running");
    expect((await client.instances.stop(second.id)).state).toBe("Stopped");
  });

  it("keeps a Standby snapshot's memory compressed, and forks and restores from it", async () => {
    const src = await create("packed-src");
    const asked = await client.instances.snapshots.create(src.id, {
      kind: "Standby",
      compression: { enabled: true, algorithm: "lz4" },
    });
    expect(asked.compression).toEqual({ enabled: true, algorithm: "lz4", level: 0 });
    expect(["compressing", "compressed"]).toContain(asked.compression_state);
    const packed = await waitFor(
      async () => {
        const s = await client.snapshots.get(asked.id);
        return s.compression_state === "compressed" && s;
      },
      { what: "the snapshot compressed" },
    );
    expect(packed.compression_error ?? null).toBeNull();
    expect(packed.uncompressed_size_bytes).toBeGreaterThan(0);
    expect(packed.compressed_size_bytes).toBeGreaterThan(0);
    const fork = await client.snapshots.fork(packed.id, { name: "packed-fork" });
    expect(fork.state).toBe("Running");
    await client.instances.standby(src.id);
    const back = await client.instances.snapshots.restore(packed.id, { id: src.id });
    expect(back.state).toBe("Running");
    // zstd at level 1 when no algorithm or level is given.
    const plain = await client.instances.snapshots.create(src.id, {
      kind: "Standby",
      compression: { enabled: true },
    });
    expect(plain.compression).toEqual({ enabled: true, algorithm: "zstd", level: 1 });
  });

  it("refuses compression a snapshot cannot have, writing nothing", async () => {
    const src = await create("packed-bad");
    const before = await client.snapshots.list({ source_instance_id: src.id });
    for (const compression of [
      { enabled: true, algorithm: "zstd" as const, level: 20 },
      { enabled: true, algorithm: "lz4" as const, level: 10 },
      { enabled: true, algorithm: "zstd" as const, level: 0 },
    ]) {
      await expect(
        client.instances.snapshots.create(src.id, { kind: "Standby", compression }),
      ).rejects.toMatchObject({ status: 400 });
    }
    await client.instances.stop(src.id);
    await expect(
      client.instances.snapshots.create(src.id, {
        kind: "Stopped",
        compression: { enabled: true },
      }),
    ).rejects.toMatchObject({ status: 400, error: { code: "invalid_request" } });
    expect(await client.snapshots.list({ source_instance_id: src.id })).toEqual(before);
  });

  it("keeps each tenant's snapshots to itself", async () => {
    const src = await create("tenant-src");
    const snap = await client.instances.snapshots.create(src.id, { kind: "Standby" });
    const other = hypeman(stack.cp.url, (await seedTenant(stack.db)).apiKey);
    await expect(other.snapshots.get(snap.id)).rejects.toBeInstanceOf(NotFoundError);
    await expect(other.snapshots.fork(snap.id, { name: "stolen" })).rejects.toBeInstanceOf(
      NotFoundError,
    );
    await expect(other.snapshots.delete(snap.id)).rejects.toBeInstanceOf(NotFoundError);
    expect(await other.snapshots.list()).toEqual([]);
  });
});
