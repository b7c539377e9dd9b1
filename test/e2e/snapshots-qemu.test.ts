import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { guestPidsUnder, memAvailable, pssOf } from "../../host-agent/testing/qemu.ts";
import { TEST_IMAGE } from "../../scripts/oci-image.ts";
import { ensureVmAssets } from "../../scripts/vm-assets.ts";
import { consoleCounts, createFilledGuest, hypeman, waitFor } from "../harness.ts";
import { killStackGuests, qemuAgentEnv, type Stack, startStack } from "./env.ts";

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
