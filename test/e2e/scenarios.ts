import { ConflictError, NotFoundError } from "@onkernel/hypeman";
import { expect } from "vitest";
import { type hypeman, waitFor } from "../harness.ts";

/**
 * The whole instance lifecycle through the official Hypeman client, unmodified: create, get by
 * id / name / prefix, list filters, stop/start/standby/restore, a fork from each source state
 * to each target state, wait, delete. Run against every deployment (Node, replicas, Workers).
 */
export async function clientScenario(client: ReturnType<typeof hypeman>): Promise<void> {
  const created = await client.instances.create({
    name: "web-1",
    image: "docker.io/library/alpine:latest",
    size: "512MB",
    vcpus: 1,
    env: { PORT: "3000" },
    tags: { team: "backend", env: "staging" },
    network: { bandwidth_download: "1Gbps", bandwidth_upload: "125MB/s" },
    disk_io_bps: "100MB/s",
  });
  expect(created.state).toBe("Running");
  expect(created.id).toMatch(/^[a-z0-9]{24}$/);
  expect(created.size).toBe("512MB");
  expect(created.network?.bandwidth_download).toBe("125MB/s");
  expect(created.network?.mac).toMatch(/^02(:[0-9a-f]{2}){5}$/);

  // {id} is an id, a name, or a unique prefix of an id.
  expect((await client.instances.get(created.id)).name).toBe("web-1");
  expect((await client.instances.get("web-1")).id).toBe(created.id);
  expect((await client.instances.get(created.id.slice(0, 10))).id).toBe(created.id);

  await client.instances.create({
    name: "worker-1",
    image: "alpine",
    vcpus: 1,
    size: "256MB",
    tags: { team: "data" },
  });
  const backend = await client.instances.list({ tags: { team: "backend" } });
  expect(backend.map((i) => i.name)).toEqual(["web-1"]);
  expect((await client.instances.list({ state: "Running" })).length).toBe(2);
  expect((await client.instances.list({ state: "Stopped" })).length).toBe(0);

  expect((await client.instances.stop("web-1")).state).toBe("Stopped");
  expect((await client.instances.list({ state: "Stopped" })).map((i) => i.name)).toEqual(["web-1"]);
  expect((await client.instances.start("web-1", {})).state).toBe("Running");
  const standby = await client.instances.standby("web-1");
  expect(standby.state).toBe("Standby");
  expect(standby.has_snapshot).toBe(true);
  expect((await client.instances.restore("web-1")).state).toBe("Running");

  // Fork from each source state with each target state.
  const sources = { Running: "web-1", Standby: "src-standby", Stopped: "src-stopped" } as const;
  await client.instances.create({
    name: "src-standby",
    image: "alpine",
    vcpus: 1,
    size: "256MB",
  });
  await client.instances.standby("src-standby");
  await client.instances.create({
    name: "src-stopped",
    image: "alpine",
    vcpus: 1,
    size: "256MB",
  });
  await client.instances.stop("src-stopped");
  for (const [from, source] of Object.entries(sources)) {
    for (const target of ["Stopped", "Standby", "Running"] as const) {
      const name = `fork-${from.toLowerCase()}-${target.toLowerCase()}`;
      const fork = await client.instances.fork(source, {
        name,
        target_state: target,
        from_running: from === "Running",
      });
      expect(fork.name, name).toBe(name);
      expect(fork.state, name).toBe(target);
      expect((await client.instances.get(source)).state, `${name}: source`).toBe(from);
    }
  }
  // Without target_state the fork takes the source's state at fork time.
  const dflt = await client.instances.fork("src-standby", { name: "fork-default" });
  expect(dflt.state).toBe("Standby");

  const waited = await client.instances.wait("fork-running-running", {
    state: "Running",
    timeout: "5s",
  });
  expect(waited).toEqual({ state: "Running", state_error: null, timed_out: false });

  await client.instances.delete("fork-running-running");
  await expect(client.instances.get("fork-running-running")).rejects.toBeInstanceOf(NotFoundError);
  await expect(client.instances.fork("web-1", { name: "web-1" })).rejects.toBeInstanceOf(
    ConflictError,
  );
}

/** Snapshots in brief, for every deployment: a Standby snapshot of a Running instance (the
 * from_running flow), a fork of it, a restore of its source, the snapshot's delete. */
export async function snapshotScenario(client: ReturnType<typeof hypeman>): Promise<void> {
  const src = await client.instances.create({ name: "snap-src", image: "alpine", size: "256MB" });
  const snap = await client.instances.snapshots.create(src.id, {
    kind: "Standby",
    name: "first",
    tags: { via: "scenario" },
    compression: { enabled: true, algorithm: "zstd", level: 2 },
  });
  expect(snap).toMatchObject({ kind: "Standby", name: "first", source_instance_id: src.id });
  expect((await client.instances.get(src.id)).state).toBe("Running");
  expect((await client.snapshots.list({ tags: { via: "scenario" } })).map((s) => s.id)).toEqual([
    snap.id,
  ]);
  const fork = await client.snapshots.fork(snap.id, { name: "snap-fork" });
  expect(fork.state).toBe("Running");
  await client.instances.stop(src.id);
  expect((await client.instances.snapshots.restore(snap.id, { id: src.id })).state).toBe("Running");
  // Its compression was issued by whoever recorded the capture, and is recorded in turn.
  const packed = await waitFor(
    async () => {
      const s = await client.snapshots.get(snap.id);
      return s.compression_state === "compressed" && s;
    },
    { what: "the snapshot compressed" },
  );
  expect(packed.compression).toEqual({ enabled: true, algorithm: "zstd", level: 2 });
  await client.snapshots.delete(snap.id);
  await expect(client.snapshots.get(snap.id)).rejects.toBeInstanceOf(NotFoundError);
  expect((await client.instances.get(fork.id)).state).toBe("Running");
  for (const id of [fork.id, src.id]) await client.instances.delete(id);
}
