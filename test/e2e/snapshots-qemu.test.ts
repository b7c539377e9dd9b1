import { existsSync, readdirSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { agentPaths } from "../../host-agent/src/paths.ts";
import { guestPidsUnder, memAvailable, pssOf } from "../../host-agent/testing/qemu.ts";
import { TEST_IMAGE } from "../../scripts/oci-image.ts";
import { ensureVmAssets } from "../../scripts/vm-assets.ts";
import { consoleCounts, createFilledGuest, hypeman, waitFor } from "../harness.ts";
import {
  killStackGuests,
  printStackOnFailure,
  qemuAgentEnv,
  type Stack,
  startStack,
} from "./env.ts";

// Snapshots of real guests (QEMU under TCG) through the official client. The test image counts
// on its console once a second, so a guest's log shows whose memory it runs on: a fork of a
// snapshot continues the count the snapshot was taken at, not its source's count of today.
describe("snapshots of real VMs (QEMU)", { timeout: 300_000 }, () => {
  let stack: Stack;
  let client: ReturnType<typeof hypeman>;
  beforeAll(async () => {
    await ensureVmAssets();
    stack = await startStack({
      cpEnv: { COMMAND_TIMEOUT_MS: "120000" },
      agents: [qemuAgentEnv()],
    });
    client = hypeman(stack.cp.url, stack.apiKey);
  }, 300_000);

  afterAll(() => killStackGuests(stack));
  printStackOnFailure(() => stack);

  const counts = (name: string) => consoleCounts(client, name);
  const last = async (name: string) => (await counts(name)).at(-1) ?? -1;
  /** Waits until `name` has counted past `n`; returns its counts. */
  const countsPast = (name: string, n: number, what: string) =>
    waitFor(
      async () => {
        const c = await counts(name);
        return (c.at(-1) ?? -1) > n ? c : undefined;
      },
      { timeoutMs: 60_000, what },
    );

  it("forks and restores from a snapshot's memory, and outlives the snapshot's source and the snapshot", async () => {
    const vm = await client.instances.create({
      name: "snap-vm",
      image: TEST_IMAGE,
      size: "256MB",
      vcpus: 1,
    });
    expect(vm.state).toBe("Running");
    await countsPast("snap-vm", 2, "the guest to count");

    // A Standby snapshot of a Running guest: it runs on, and goes on counting.
    const before = await last("snap-vm");
    const live = await client.instances.snapshots.create("snap-vm", {
      kind: "Standby",
      name: "live",
    });
    const after = await last("snap-vm");
    expect(before).toBeGreaterThanOrEqual(0);
    expect((await client.instances.get("snap-vm")).state).toBe("Running");
    expect(live.size_bytes).toBeGreaterThan(0);
    await countsPast("snap-vm", after + 3, "the source to count on after its snapshot");

    // The fork continues from the snapshot's count, not from the source's present one.
    const fork = await client.snapshots.fork(live.id, { name: "snap-fork-1" });
    expect(fork.state).toBe("Running");
    const forked = await countsPast("snap-fork-1", -1, "the fork to count");
    expect(forked[0]).toBeGreaterThanOrEqual(before);
    expect(forked[0]).toBeLessThanOrEqual(after + 1);
    expect(await last("snap-vm")).toBeGreaterThan(after + 2);

    // A Stopped snapshot holds the disk alone: its fork boots and counts from the start.
    await client.instances.stop("snap-vm");
    const disk = await client.instances.snapshots.create("snap-vm", { kind: "Stopped" });
    // The source goes (Hypeman's #298: a fork must not depend on its source's memory file).
    await client.instances.delete("snap-vm");
    expect((await client.snapshots.fork(live.id, { name: "snap-fork-2" })).state).toBe("Running");
    const again = await countsPast("snap-fork-2", -1, "the second fork to count");
    expect(again[0]).toBeLessThanOrEqual(after + 1);
    const booted = await client.snapshots.fork(disk.id, {
      name: "snap-boot",
      target_state: "Running",
    });
    expect(booted.state).toBe("Running");
    const fresh = await countsPast("snap-boot", -1, "the disk snapshot's fork to count");
    expect(fresh[0]).toBeLessThanOrEqual(1);

    // The snapshot goes too; its forks run on their own files, through standby and restore.
    await client.snapshots.delete(live.id);
    await client.snapshots.delete(disk.id);
    expect(await client.snapshots.list()).toEqual([]);
    const n2 = await last("snap-fork-2");
    await countsPast("snap-fork-2", n2, "the second fork to count on after the snapshot's delete");
    expect((await client.instances.standby("snap-fork-1")).state).toBe("Standby");
    expect((await client.instances.restore("snap-fork-1")).state).toBe("Running");
    const n1 = await last("snap-fork-1");
    await countsPast("snap-fork-1", n1, "the first fork to count on after standby and restore");

    // Restore in place: the fork goes back to its own snapshot's count, in the same log.
    const mark = await last("snap-fork-1");
    const own = await client.instances.snapshots.create("snap-fork-1", { kind: "Standby" });
    const ownAfter = await last("snap-fork-1");
    await countsPast("snap-fork-1", ownAfter + 3, "the fork to count on after its snapshot");
    await client.instances.stop("snap-fork-1");
    const logged = (await counts("snap-fork-1")).length;
    const restored = await client.instances.snapshots.restore(own.id, { id: "snap-fork-1" });
    expect(restored).toMatchObject({ id: fork.id, state: "Running" });
    expect(restored.network?.ip).toBe(fork.network?.ip);
    const resumed = await waitFor(async () => (await counts("snap-fork-1")).slice(logged)[0], {
      timeoutMs: 60_000,
      what: "the restored fork to count",
    });
    expect(resumed).toBeGreaterThanOrEqual(mark);
    expect(resumed).toBeLessThanOrEqual(ownAfter + 1);

    for (const name of ["snap-fork-1", "snap-fork-2", "snap-boot"]) {
      await client.instances.delete(name);
    }
    await client.snapshots.delete(own.id);
  });

  it("keeps a snapshot's memory compressed at rest and decompresses it once for its forks", async () => {
    const memBases = agentPaths(stack.agents[0]?.dataDir ?? "/nonexistent").qemu.memBasesDir;
    const bases = () => (existsSync(memBases) ? readdirSync(memBases) : []);
    await client.instances.create({ name: "packed", image: TEST_IMAGE, size: "256MB", vcpus: 1 });
    await countsPast("packed", 2, "the guest to count");
    const before = await last("packed");
    const asked = await client.instances.snapshots.create("packed", {
      kind: "Standby",
      compression: { enabled: true, algorithm: "zstd", level: 3 },
    });
    const after = await last("packed");
    // The source restored onto its own copy: only the snapshot holds the memory base.
    expect(bases()).toHaveLength(1);
    const snap = await waitFor(
      async () => {
        const s = await client.snapshots.get(asked.id);
        if (s.compression_state === "error") throw new Error(s.compression_error ?? "error");
        return s.compression_state === "compressed" && s;
      },
      { timeoutMs: 60_000, what: "the snapshot compressed" },
    );
    const MiB = 1024 * 1024;
    expect(snap.uncompressed_size_bytes).toBe(256 * MiB);
    expect(snap.compressed_size_bytes).toBeGreaterThan(0);
    expect(snap.compressed_size_bytes ?? Infinity).toBeLessThan(asked.size_bytes);
    expect(snap.size_bytes).toBeLessThan(asked.size_bytes);
    // At rest the compressed file is all: the uncompressed base is gone.
    expect(bases()).toEqual([]);

    // Two forks at once: one decompressed copy, mapped by both, each continuing the
    // snapshot's count.
    await Promise.all(
      ["packed-1", "packed-2"].map((name) => client.snapshots.fork(snap.id, { name })),
    );
    expect(bases()).toHaveLength(1);
    for (const name of ["packed-1", "packed-2"]) {
      const c = await countsPast(name, -1, `${name} to count`);
      expect(c[0]).toBeGreaterThanOrEqual(before);
      expect(c[0]).toBeLessThanOrEqual(after + 1);
    }
    // A fork in Standby keeps its memory in its own stream; a compressed snapshot of it holds
    // that stream compressed, and a fork of that one continues the fork's count.
    await client.instances.standby("packed-1");
    const parkedAt = await last("packed-1");
    const inner = await client.instances.snapshots.create("packed-1", {
      kind: "Standby",
      compression: { enabled: true, algorithm: "lz4" },
    });
    await waitFor(
      async () => (await client.snapshots.get(inner.id)).compression_state === "compressed",
      { timeoutMs: 60_000, what: "the fork's snapshot compressed" },
    );
    await client.snapshots.fork(inner.id, { name: "packed-3" });
    const c3 = await countsPast("packed-3", -1, "the fork's fork to count");
    expect(c3[0]).toBeGreaterThanOrEqual(parkedAt);
    expect(c3[0]).toBeLessThanOrEqual(parkedAt + 1);
    await client.instances.delete("packed-3");
    await client.snapshots.delete(inner.id);

    // Once no fork maps it, the copy goes and the snapshot is back to its compressed file.
    await client.instances.delete("packed-1");
    expect(bases()).toHaveLength(1);
    await client.instances.delete("packed-2");
    expect(bases()).toEqual([]);
    expect((await client.snapshots.get(snap.id)).compression_state).toBe("compressed");

    await client.instances.delete("packed");
    await client.snapshots.delete(snap.id);
  });

  // The small versions of BENCHMARKS.md's fan-out and density: forks of one snapshot requested
  // at once all run; ten forks of a guest that filled 40 % of its RAM, running side by side,
  // cost the host a fraction of ten copies of that memory.
  it("runs six forks of one snapshot requested at once, and ten live forks share its memory", async () => {
    await createFilledGuest(client, "filled", 120_000);
    const snap = await client.instances.snapshots.create("filled", { kind: "Standby" });
    await client.instances.delete("filled");

    const burst = await Promise.all(
      Array.from({ length: 6 }, (_, i) => client.snapshots.fork(snap.id, { name: `fan-${i}` })),
    );
    expect(burst.map((f) => f.state)).toEqual(Array(6).fill("Running"));
    for (let i = 6; i < 10; i++) {
      expect((await client.snapshots.fork(snap.id, { name: `fan-${i}` })).state).toBe("Running");
    }

    // Each fork's memory is the snapshot's file, mapped copy-on-write: the ten together hold a
    // little more than one guest's touched memory, not ten times it.
    const pids = guestPidsUnder(stack.agents[0]?.dataDir ?? "/nonexistent");
    expect(pids).toHaveLength(10);
    const pss = pssOf(pids);
    const MiB = 1024 * 1024;
    expect(pss).toBeGreaterThan(100 * MiB); // the filled pages are there, once
    expect(pss).toBeLessThan(10 * 256 * MiB * 0.4); // ten copies of the filled 40 % would be 1 GiB
    console.log(
      `ten forks: summed PSS ${(pss / MiB).toFixed(0)} MiB; MemAvailable ${(memAvailable() / MiB).toFixed(0)} MiB`,
    );
    for (let i = 0; i < 10; i++) await client.instances.delete(`fan-${i}`);
    await client.snapshots.delete(snap.id);
  });
});
