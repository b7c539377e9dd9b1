// Snapshot benchmarks with real QEMU guests (TCG): `BENCH_ONLY=snapshots npm run bench`. A
// control-plane process and a QEMU agent process over its WebSocket; one 256 MiB source guest
// that has filled 40 % of its RAM (a 100 MiB file in its page cache) and then idles, snapshotted
// (Standby) while it runs. Figures are reported, never asserted.
//
// (1) fan-out: forks of the snapshot to Running, one alone (sequentially, each deleted), then
//     BENCH_FANOUT (25) requested at once: each request's time to 201 Running, and the wall
//     time of the burst;
// (2) density: forks of the snapshot to Running, kept running and idle, one after another,
//     until the host's admission refuses one or BENCH_DENSITY (100) run; the host's
//     MemAvailable before and after, the QEMU processes' summed PSS, and the memory each
//     extra fork costs;
// (3) compression: compressed snapshots of the same source by each algorithm: time to
//     compressed, sizes, and a fork from each beside a fork from the uncompressed one.
import { APIError } from "@onkernel/hypeman";
import { TestNamespaces } from "../host-agent/testing/netns.ts";
import {
  cpuSecondsOf,
  guestPidsUnder,
  killGuestsUnder,
  memAvailable,
  pssOf,
} from "../host-agent/testing/qemu.ts";
import { ensurePostgres } from "../scripts/postgres.ts";
import { ensureVmAssets } from "../scripts/vm-assets.ts";
import { qemuAgentEnv } from "../test/e2e/env.ts";
import {
  createFilledGuest,
  hypeman,
  spawnAgent,
  spawnControlPlane,
  waitFor,
} from "../test/harness.ts";
import { benchDatabase } from "./sim-stack.ts";
import { percentile } from "./stats.ts";

const FANOUT = Number(process.env.BENCH_FANOUT ?? 25);
const DENSITY = Number(process.env.BENCH_DENSITY ?? 100);
const ALONE = 5;
const MiB = 1024 * 1024;

const ms = (x: number) => `${Math.round(x)} ms`;
const mib = (b: number) => `${(b / MiB).toFixed(0)} MiB`;

export async function runSnapshotsBench(command: string): Promise<string> {
  await ensureVmAssets();
  const pg = process.env.BENCH_DATABASE_URL ? undefined : await ensurePostgres({ durable: true });
  const serverUrl = process.env.BENCH_DATABASE_URL ?? pg?.url ?? "";
  const log = (m: string) => console.error(`[bench:snapshots] ${m}`);
  const spaces = new TestNamespaces();
  const db = await benchDatabase(serverUrl, "bench_snapshots");
  const cp = await spawnControlPlane({
    databaseUrl: db.url,
    // Idle guests time-share the two cores: vCPUs are not what runs out here.
    env: { COMMAND_TIMEOUT_MS: "600000", VCPU_OVERCOMMIT: "64" },
  });
  const agent = await spawnAgent({
    cpUrl: cp.url,
    token: db.token,
    env: qemuAgentEnv({
      AGENT_NETNS: await spaces.create("bench"),
      AGENT_VCPUS: "2",
      AGENT_MEMORY: String(Math.floor(memAvailable() * 0.9)),
      ...(process.env.AGENT_LAUNCH_CONCURRENCY && {
        AGENT_LAUNCH_CONCURRENCY: process.env.AGENT_LAUNCH_CONCURRENCY,
      }),
    }),
  });
  const client = hypeman(cp.url, db.key);
  const lines: string[] = [];
  try {
    await waitFor(async () => (await client.images.list()).length > 0, {
      timeoutMs: 60_000,
      what: "the host's image",
    });
    await createFilledGuest(client, "src", 300_000);
    const snap = await client.instances.snapshots.create("src", { kind: "Standby" });
    log(`snapshot ${snap.id}: ${mib(snap.size_bytes)}`);
    const packed = await compressionBench(client, snap.id, log);
    await client.instances.stop("src");

    // (1) fan-out
    const fork = async (name: string) => {
      const t0 = performance.now();
      const f = await client.snapshots.fork(snap.id, { name });
      if (f.state !== "Running") throw new Error(`${name} is ${f.state}`);
      return { id: f.id, ms: performance.now() - t0 };
    };
    const alone: number[] = [];
    for (let i = 0; i < ALONE; i++) {
      const f = await fork(`alone-${i}`);
      alone.push(f.ms);
      await client.instances.delete(f.id);
    }
    log(`one fork alone: ${alone.map(ms).join(", ")}`);
    const t0 = performance.now();
    const burst = await Promise.allSettled(
      Array.from({ length: FANOUT }, (_, i) => fork(`fan-${i}`)),
    );
    const wall = performance.now() - t0;
    const ok = burst.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
    const failed = burst.flatMap((r) => (r.status === "rejected" ? [String(r.reason)] : []));
    const fan = ok.map((f) => f.ms);
    log(`fan-out: ${ok.length} ok, ${failed.length} failed, wall ${ms(wall)}`);
    for (const f of ok) await client.instances.delete(f.id);
    const p50 = percentile(fan, 50);
    const p95 = percentile(fan, 95);

    // (2) density
    const before = memAvailable();
    const live: string[] = [];
    let refusal = "";
    let reconnects = 0;
    for (let i = 0; i < DENSITY; i++) {
      try {
        live.push((await fork(`dense-${i}`)).id);
      } catch (e) {
        // A host saturated by its guests can miss heartbeats and reconnect: wait for it, and
        // count it. Anything else (admission's 409, a failed fork) ends the run.
        if (e instanceof APIError && e.status === 503 && reconnects < 5) {
          reconnects++;
          log(`host away (${e.message}); waiting for it`);
          await waitFor(async () => (await client.images.list()).length > 0, {
            timeoutMs: 120_000,
          });
          await client.instances.delete(`dense-${i}`).catch(() => {});
          i--;
          continue;
        }
        refusal = String(e);
        break;
      }
      if ((i + 1) % 10 === 0) log(`${i + 1} forks running, MemAvailable ${mib(memAvailable())}`);
    }
    // Idle: let the last restores settle before measuring.
    await new Promise((r) => setTimeout(r, 10_000));
    const after = memAvailable();
    const pids = guestPidsUnder(agent.dataDir);
    const pss = { processes: pids.length, bytes: pssOf(pids) };
    const cpu0 = cpuSecondsOf(pids);
    await new Promise((r) => setTimeout(r, 10_000));
    const idleCores = (cpuSecondsOf(pids) - cpu0) / 10;
    const perFork = (before - after) / Math.max(1, live.length);
    for (const id of live) await client.instances.delete(id);

    lines.push(
      "### Snapshots: fan-out and density (real QEMU guests, TCG)",
      "",
      `Command: \`${command}\`. One 256 MiB guest fills 40 % of its RAM (a 100 MiB file of random bytes in its page cache) and idles, gets a Standby snapshot while it runs (${mib(snap.size_bytes)} on disk), and is stopped; every fork below is of that snapshot, to Running, through the control plane and the agent's WebSocket. 2 cores, ${mib(memAvailable())} available after the run.`,
      "",
      "| fan-out | forks | p50 | p95 | max | p95 ÷ p50 | wall | failed |",
      "|---|---|---|---|---|---|---|---|",
      `| one alone (sequential) | ${ALONE} | ${ms(percentile(alone, 50))} | ${ms(percentile(alone, 95))} | ${ms(Math.max(...alone))} | — | — | 0 |`,
      `| all at once | ${FANOUT} | ${ms(p50)} | ${ms(p95)} | ${ms(Math.max(...fan))} | ${(p95 / p50).toFixed(2)} | ${ms(wall)} | ${failed.length} |`,
      "",
      "| density | value |",
      "|---|---|",
      `| forks running at once | ${live.length}${refusal ? ` (the next refused: ${refusal.slice(0, 160)})` : ` (the ${DENSITY} asked for)`} |`,
      `| times the saturated host's agent reconnected meanwhile | ${reconnects} |`,
      `| host MemAvailable before → after | ${mib(before)} → ${mib(after)} |`,
      `| memory each extra fork cost (MemAvailable drop ÷ forks) | ${mib(perFork)} (${((perFork / (256 * MiB)) * 100).toFixed(1)} % of its 256 MiB) |`,
      `| summed PSS of the ${pss.processes} QEMU processes | ${mib(pss.bytes)} (${mib(pss.bytes / Math.max(1, pss.processes))} each) |`,
      `| CPU the idle forks use (over 10 s) | ${idleCores.toFixed(2)} cores (${((idleCores / Math.max(1, live.length)) * 100).toFixed(1)} % of a core each) |`,
      ...(failed.length ? ["", `Fan-out failures: ${failed.slice(0, 3).join("; ")}`] : []),
      "",
      `Compression: more Standby snapshots of the same running guest, each asked to be compressed; the time from the request to \`compression_state: compressed\`, the memory payload's sizes, and forks to Running from each compressed snapshot (each deleted before the next, so each decompresses) beside forks from the uncompressed snapshot, alternated, ${PACKED_FORKS} of each, medians.`,
      "",
      "| algorithm, level | capture + compress | payload | compressed | ratio | fork from it | fork from the uncompressed snapshot |",
      "|---|---|---|---|---|---|---|",
      ...packed.map(
        (p) =>
          `| ${p.algorithm} ${p.level} | ${ms(p.compressMs)} | ${mib(p.uncompressed)} | ${mib(p.compressed)} | ${(p.uncompressed / p.compressed).toFixed(2)} | ${ms(p.forkMs)} | ${ms(p.plainForkMs)} |`,
      ),
    );
  } finally {
    await killGuestsUnder(agent.dataDir);
    await agent.stop();
    await cp.stop();
    await spaces.cleanup();
    await pg?.stop();
  }
  return lines.join("\n");
}

const PACKED_FORKS = 3;
const COMPRESSIONS = [
  { algorithm: "lz4", level: 0 },
  { algorithm: "zstd", level: 1 },
  { algorithm: "zstd", level: 3 },
] as const;

/** (3) compression: for each algorithm, a compressed Standby snapshot of the running source,
 * how long until it is compressed, its sizes, and forks from it beside forks from `plain`. */
async function compressionBench(
  client: ReturnType<typeof hypeman>,
  plain: string,
  log: (m: string) => void,
) {
  const forkMs = async (snapshot: string, name: string) => {
    const t0 = performance.now();
    const f = await client.snapshots.fork(snapshot, { name });
    const took = performance.now() - t0;
    if (f.state !== "Running") throw new Error(`${name} is ${f.state}`);
    await client.instances.delete(f.id);
    return took;
  };
  const rows = [];
  for (const { algorithm, level } of COMPRESSIONS) {
    const t0 = performance.now();
    const asked = await client.instances.snapshots.create("src", {
      kind: "Standby",
      compression: { enabled: true, algorithm, level },
    });
    const done = await waitFor(
      async () => {
        const s = await client.snapshots.get(asked.id);
        if (s.compression_state === "error") throw new Error(s.compression_error ?? "error");
        return s.compression_state === "compressed" && s;
      },
      { timeoutMs: 600_000, intervalMs: 20, what: `${algorithm} ${level} compression` },
    );
    const compressMs = performance.now() - t0;
    const fromIt: number[] = [];
    const fromPlain: number[] = [];
    for (let i = 0; i < PACKED_FORKS; i++) {
      fromIt.push(await forkMs(done.id, `packed-${algorithm}-${level}-${i}`));
      fromPlain.push(await forkMs(plain, `plain-${algorithm}-${level}-${i}`));
    }
    const row = {
      algorithm,
      level,
      compressMs,
      uncompressed: done.uncompressed_size_bytes ?? 0,
      compressed: done.compressed_size_bytes ?? 0,
      forkMs: percentile(fromIt, 50),
      plainForkMs: percentile(fromPlain, 50),
    };
    log(`compression ${JSON.stringify(row)}`);
    rows.push(row);
    await client.snapshots.delete(done.id);
  }
  return rows;
}
