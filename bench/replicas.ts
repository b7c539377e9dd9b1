// Fork round trip when the request lands on a replica that does not hold the host's agent
// (the command and its result cross replicas over LISTEN/NOTIFY), against the same request on
// the agent's own replica, measured interleaved in one run; and the same fork through the
// Worker under `wrangler dev`. Used by bench/run.ts; `npm run bench:replicas` prints it alone.
import os from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { startAgent } from "../host-agent/src/index.ts";
import { ensurePostgres } from "../scripts/postgres.ts";
import { spawnControlPlane } from "../test/harness.ts";
import { wranglerDev } from "../test/wrangler.ts";
import { benchDatabase, http, simAgentConfig, standbySource, waitOnline } from "./sim-stack.ts";
import { fmt, summary } from "./stats.ts";

const N = Number(process.env.BENCH_REPLICA_FORKS ?? 200);
const WARMUP = 20;

/** One fork of the Standby source through `base`, timed; the fork is deleted untimed. */
async function timedFork(base: string, key: string, name: string): Promise<number> {
  const t0 = performance.now();
  const fork = await http(base, key, "POST", "/instances/src/fork", { name });
  const ms = performance.now() - t0;
  if (fork) await http(base, key, "DELETE", `/instances/${fork.id}`);
  return ms;
}

export async function benchReplicas(serverUrl: string, root: string): Promise<string[]> {
  // --- Node: replica A holds the agent; forks through A and through B, alternating ----------
  const node = await benchDatabase(serverUrl, "bench_replicas");
  const env = { HEARTBEAT_MS: "5000", HOST_GRACE_MS: "15000" };
  const a = await spawnControlPlane({ databaseUrl: node.url, env });
  const b = await spawnControlPlane({ databaseUrl: node.url, env });
  const agent = await startAgent(
    simAgentConfig(a.url, node.token, join(root, "replicas-agent"), "bench-host"),
    { log: () => {} },
  );
  const same: number[] = [];
  const cross: number[] = [];
  try {
    await waitOnline(a.url, node.key);
    await standbySource(a.url, node.key);
    for (let i = 0; i < N + WARMUP; i++) {
      const viaA = await timedFork(a.url, node.key, `a-${i}`);
      const viaB = await timedFork(b.url, node.key, `b-${i}`);
      if (i >= WARMUP) {
        same.push(viaA);
        cross.push(viaB);
      }
    }
  } finally {
    await agent.stop();
    await a.stop();
    await b.stop();
  }

  // --- Workers: the same fork through the Worker under wrangler dev -------------------------
  const wdb = await benchDatabase(serverUrl, "bench_workers");
  const worker = await wranglerDev(wdb.url, { HEARTBEAT_MS: "5000", HOST_GRACE_MS: "15000" });
  const wagent = await startAgent(
    simAgentConfig(worker.url, wdb.token, join(root, "workers-agent"), "bench-host"),
    { log: () => {} },
  );
  const viaWorker: number[] = [];
  try {
    await waitOnline(worker.url, wdb.key);
    await standbySource(worker.url, wdb.key);
    for (let i = 0; i < N + WARMUP; i++) {
      const ms = await timedFork(worker.url, wdb.key, `w-${i}`);
      if (i >= WARMUP) viaWorker.push(ms);
    }
  } finally {
    await wagent.stop();
    await worker.stop();
  }

  const s = summary(same);
  const c = summary(cross);
  const w = summary(viaWorker);
  const row = (what: string, x: ReturnType<typeof summary>) =>
    `| ${what} | ${x.n} | ${fmt(x.p50)} | ${fmt(x.p99)} | ${fmt(x.max)} |`;
  return [
    "## Replicas and Workers (sim driver)",
    "",
    `Two Node control-plane processes on one Postgres server; one sim agent connected to replica A. Each round forks the Standby source once through A and once through B (which must hand the command to A over LISTEN/NOTIFY, and learn of the result the same way), ${N} rounds after ${WARMUP} warm-up rounds. Then the same fork through the Worker under \`wrangler dev\` (workerd, local; Hyperdrive pointed at the same Postgres server), whose HostSession Durable Object holds the agent.`,
    "",
    "| fork request | n | p50 | p99 | max |",
    "|---|---|---|---|---|",
    row("through the agent's replica (A)", s),
    row("through another replica (B)", c),
    row("through the Worker (wrangler dev)", w),
    "",
    `- Added by crossing replicas: p50 ${fmt(c.p50 - s.p50)}, p99 ${fmt(c.p99 - s.p99)} (target: p50 < 3 ms).`,
    `- Worker vs. a Node replica holding the agent: p50 ${fmt(w.p50 - s.p50)} more (${(w.p50 / s.p50).toFixed(2)}×).`,
    "",
  ];
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const pg = process.env.BENCH_DATABASE_URL ? undefined : await ensurePostgres({ durable: true });
  const { mkdtempSync, rmSync } = await import("node:fs");
  const root = mkdtempSync(join(os.tmpdir(), "offshoot-bench-replicas-"));
  try {
    const lines = await benchReplicas(process.env.BENCH_DATABASE_URL ?? pg?.url ?? "", root);
    console.log(lines.join("\n"));
  } finally {
    rmSync(root, { recursive: true, force: true });
    await pg?.stop();
  }
}
