// `npm run bench`: control-plane benchmarks against a real Postgres server (the sim part), then
// fork benchmarks with real QEMU guests (the VM part, bench/vm.ts), then image pulls and boots
// (the images part, bench/images.ts), then exec and cp in a real guest (bench/exec.ts), then
// snapshots' fan-out and density (bench/snapshots.ts), written to BENCHMARKS.md.
// BENCH_ONLY=sim, vm, images, exec or snapshots runs one part; the other parts' last figures
// are kept.
// Not a test: figures are reported, never asserted.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import { openPostgres } from "../control-plane/src/db/open.ts";
import {
  createApiKey,
  createHost,
  ensureTenant,
} from "../control-plane/src/services/credentials.ts";
import { type RunningAgent, startAgent } from "../host-agent/src/index.ts";
import type { Logger } from "../host-agent/src/log.ts";
import { ensurePostgres } from "../scripts/postgres.ts";
import { spawnControlPlane } from "../test/harness.ts";
import { runExecBench } from "./exec.ts";
import { runImagesBench } from "./images.ts";
import { benchReplicas } from "./replicas.ts";
import { writeBenchPart } from "./results.ts";
import {
  benchDatabase,
  freshDatabase,
  http,
  simAgentConfig,
  standbySource,
  waitOnline,
} from "./sim-stack.ts";
import { runSnapshotsBench } from "./snapshots.ts";
import { fmt, summary } from "./stats.ts";
import { runVmBench, vmBenchOptionsFromEnv } from "./vm.ts";

const FORKS = Number(process.env.BENCH_FORKS ?? 500);
const FLEET = Number(process.env.BENCH_AGENTS ?? 1000);
const FLEET_FORKS = Number(process.env.BENCH_FLEET_FORKS ?? 300);

const silent = () => {};

function rssKb(pid: number): number {
  const m = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(m?.[1] ?? 0);
}

async function startAgents(
  cpUrl: string,
  tokens: string[],
  root: string,
  log: Logger = silent,
): Promise<RunningAgent[]> {
  const agents: RunningAgent[] = [];
  // Connect in small batches, as a fleet coming up would.
  for (let i = 0; i < tokens.length; i += 50) {
    const batch = tokens.slice(i, i + 50).map((token, j) =>
      startAgent(simAgentConfig(cpUrl, token, join(root, `a${i + j}`), `bench-${i + j}`), {
        log,
      }),
    );
    agents.push(...(await Promise.all(batch)));
  }
  return agents;
}

/** Sequential forks of one Standby source: request → 201, client-side wall time. */
async function forkLoop(cpUrl: string, key: string, source: string, n: number, prefix: string) {
  const ms: number[] = [];
  for (let i = 0; i < n + 20; i++) {
    const t0 = performance.now();
    const fork = await http(cpUrl, key, "POST", `/instances/${source}/fork`, {
      name: `${prefix}-${i}`,
    });
    const dt = performance.now() - t0;
    if (i >= 20) ms.push(dt); // the first 20 warm up JIT and connection pools
    if (fork) await http(cpUrl, key, "DELETE", `/instances/${fork.id}`);
  }
  return summary(ms);
}

async function simBench() {
  const pg = process.env.BENCH_DATABASE_URL ? undefined : await ensurePostgres({ durable: true });
  const serverUrl = process.env.BENCH_DATABASE_URL ?? pg?.url ?? "";
  const root = mkdtempSync(join(os.tmpdir(), "offshoot-bench-"));
  const lines: string[] = [];
  try {
    // --- 1: fork round trip, one host -------------------------------------------------------
    const { url: url1, key: key1, token } = await benchDatabase(serverUrl, "bench_fork");
    const cp1 = await spawnControlPlane({
      databaseUrl: url1,
      env: { HEARTBEAT_MS: "5000", HOST_GRACE_MS: "15000" },
    });
    // The agent's own time per fork (journal, sim driver), from its "command finished" lines.
    const agentForkMs: number[] = [];
    const [agent] = await startAgents(cp1.url, [token], root, (_level, msg, fields) => {
      if (msg === "command finished" && fields?.kind === "fork")
        agentForkMs.push(Number(fields.ms));
    });
    await waitOnline(cp1.url, key1);
    await standbySource(cp1.url, key1);
    const forksBefore = agentForkMs.length;
    const single = await forkLoop(cp1.url, key1, "src", FORKS, "f");
    // The same forks as the loop's timed ones (it times all but its first 20).
    const agentFork = summary(agentForkMs.slice(forksBefore + 20));
    // Reference points on the same stack: the floor (HTTP + auth + one query) and a one-step
    // lifecycle command (standby/restore: one host command, no flow).
    const gets: number[] = [];
    for (let i = 0; i < 520; i++) {
      const t0 = performance.now();
      await http(cp1.url, key1, "GET", "/instances/src");
      if (i >= 20) gets.push(performance.now() - t0);
    }
    const verbs: number[] = [];
    for (let i = 0; i < 110; i++) {
      for (const verb of ["restore", "standby"]) {
        const t0 = performance.now();
        await http(cp1.url, key1, "POST", `/instances/src/${verb}`);
        if (i >= 10) verbs.push(performance.now() - t0);
      }
    }
    const get = summary(gets);
    const verb = summary(verbs);
    const fromRunning: number[] = [];
    await http(cp1.url, key1, "POST", "/instances/src/restore");
    for (let i = 0; i < 110; i++) {
      const t0 = performance.now();
      const fork = await http(cp1.url, key1, "POST", "/instances/src/fork", {
        name: `r-${i}`,
        from_running: true,
      });
      if (i >= 10) fromRunning.push(performance.now() - t0);
      if (fork) await http(cp1.url, key1, "DELETE", `/instances/${fork.id}`);
    }
    const running = summary(fromRunning);
    await agent?.stop();
    await cp1.stop();
    console.log("fork round trip, 1 host:", single);

    // --- 2: a fleet of simulated agents on one control plane ---------------------------------
    const url2 = await freshDatabase(serverUrl, "bench_fleet");
    const db2 = await openPostgres(url2, { max: 4 });
    const tenant2 = await ensureTenant(db2.db, "bench");
    const { key: key2 } = await createApiKey(db2.db, tenant2);
    const tokens: string[] = [];
    for (let i = 0; i < FLEET; i++) tokens.push((await createHost(db2.db, `fleet-${i}`)).token);
    const cp2 = await spawnControlPlane({
      databaseUrl: url2,
      env: { HEARTBEAT_MS: "5000", HOST_GRACE_MS: "15000" },
    });
    await new Promise((r) => setTimeout(r, 2000));
    const rssBefore = rssKb(cp2.pid);
    const fleetStart = performance.now();
    const fleet = await startAgents(cp2.url, tokens, join(root, "fleet"));
    const online = async () => {
      const rows = await db2.db.execute<{ n: number }>(
        "select count(*)::int as n from hosts where status = 'online' and last_seen_at > now() - interval '12 seconds'" as never,
      );
      return Number((rows as unknown as Array<{ n: number }>)[0]?.n ?? 0);
    };
    while ((await online()) < FLEET) await new Promise((r) => setTimeout(r, 200));
    const connectSeconds = (performance.now() - fleetStart) / 1000;
    await new Promise((r) => setTimeout(r, 5000));
    const rssAfter = rssKb(cp2.pid);
    // Heartbeats steady: every host fresh (seen in the last 12 s, heartbeat every 5 s) at
    // three samples 6 s apart, while forks run.
    const fresh: number[] = [];
    await standbySource(cp2.url, key2);
    const sampler = (async () => {
      for (let i = 0; i < 3; i++) {
        await new Promise((r) => setTimeout(r, 6000));
        fresh.push(await online());
      }
    })();
    const fleetForks = await forkLoop(cp2.url, key2, "src", FLEET_FORKS, "g");
    await sampler;
    await Promise.all(fleet.map((a) => a.stop()));
    await cp2.stop();
    await db2.close();
    const perConnKb = (rssAfter - rssBefore) / FLEET;
    console.log("fleet:", { fleetForks, rssBefore, rssAfter, perConnKb, fresh, connectSeconds });

    const cpu = os.cpus()[0]?.model ?? "unknown";
    const pgVersion = execFileSync("/usr/lib/postgresql/15/bin/postgres", ["--version"])
      .toString()
      .trim();
    const settings = postgres(serverUrl, { max: 1, onnotice: () => {} });
    const [durability] = await settings<{ fsync: string; sc: string }[]>`
      select current_setting('fsync') as fsync, current_setting('synchronous_commit') as sc`;
    await settings.end();
    const durable =
      durability?.fsync === "on" && durability.sc === "on"
        ? "fsync on, synchronous_commit on: every COMMIT is flushed to disk, as on a production server"
        : `fsync ${durability?.fsync}, synchronous_commit ${durability?.sc}`;
    lines.push(
      `Produced by \`npm run bench\` (bench/run.ts) on ${new Date().toISOString().slice(0, 10)}: ${os.cpus().length} × ${cpu}, ${Math.round(os.totalmem() / 2 ** 30)} GiB, Node ${process.version}, ${pgVersion} on loopback (${durable}).`,
      "Figures are client-side wall times of sequential HTTP requests (request → 201), after 20 warm-up requests. These machines are shared and noisy: read them as orders of magnitude.",
      "",
      "## Fork round trip (sim driver, zero latency)",
      "",
      "The control plane runs as its own process against the Postgres server; the sim agents run inside the benchmark process and connect over real WebSockets on loopback. Their journals are on the root filesystem (ext4), fdatasync'd as in production; the sim's instance files, which stand in for hypervisor processes, are on tmpfs (`SIM_STATE_DIR` under /dev/shm). The fork source is in Standby; each fork is deleted again outside the timed section.",
      "",
      "| request | n | p50 | p99 | max | target |",
      "|---|---|---|---|---|---|",
      `| fork (Standby source), 1 host connected | ${single.n} | ${fmt(single.p50)} | ${fmt(single.p99)} | ${fmt(single.max)} | p50 < 5 ms, p99 < 20 ms |`,
      `| of which the agent: command received → result sent (journal fdatasync'd twice, sim driver's files) | ${agentFork.n} | ${fmt(agentFork.p50)} | ${fmt(agentFork.p99)} | ${fmt(agentFork.max)} | |`,
      `| fork (Standby source), ${FLEET} hosts connected | ${fleetForks.n} | ${fmt(fleetForks.p50)} | ${fmt(fleetForks.p99)} | ${fmt(fleetForks.max)} | p99 < 50 ms |`,
      `| fork with from_running (3 host commands), 1 host | ${running.n} | ${fmt(running.p50)} | ${fmt(running.p99)} | ${fmt(running.max)} | |`,
      `| standby or restore (1 host command), 1 host | ${verb.n} | ${fmt(verb.p50)} | ${fmt(verb.p99)} | ${fmt(verb.max)} | |`,
      `| GET /instances/{id} (no host command) | ${get.n} | ${fmt(get.p50)} | ${fmt(get.p99)} | ${fmt(get.max)} | |`,
      "",
      `## ${FLEET} simulated agents on one control-plane process`,
      "",
      `- Connected (hello + reconcile + online) in ${connectSeconds.toFixed(1)} s, in batches of 50.`,
      `- Heartbeats steady: hosts seen within the last 12 s (heartbeat every 5 s), sampled 3× during the fork run: ${fresh.join(", ")} of ${FLEET}.`,
      `- Control-plane RSS ${Math.round(rssBefore / 1024)} MiB before the agents connected, ${Math.round(rssAfter / 1024)} MiB after: ${perConnKb.toFixed(1)} KiB per connection.`,
      "",
    );
    // --- 3: replicas and Workers ----------------------------------------------------------
    lines.push(...(await benchReplicas(serverUrl, root)));
    writeBenchPart("sim", lines.join("\n"));
    console.log(lines.join("\n"));
  } finally {
    rmSync(root, { recursive: true, force: true });
    await pg?.stop();
  }
}

async function main() {
  const only = process.env.BENCH_ONLY;
  if (only !== undefined && !["sim", "vm", "images", "exec", "snapshots"].includes(only)) {
    throw new Error(
      `BENCH_ONLY must be "sim", "vm", "images", "exec" or "snapshots", not "${only}"`,
    );
  }
  const command = only ? `BENCH_ONLY=${only} npm run bench` : "npm run bench";
  if (only === undefined || only === "sim") await simBench();
  if (only === undefined || only === "vm") {
    const text = await runVmBench(vmBenchOptionsFromEnv(command));
    writeBenchPart("vm", text);
    console.log(text);
  }
  if (only === undefined || only === "images") {
    const text = await runImagesBench(command);
    writeBenchPart("images", text);
    console.log(text);
  }
  if (only === undefined || only === "exec") {
    const text = await runExecBench(command);
    writeBenchPart("exec", text);
    console.log(text);
  }
  if (only === undefined || only === "snapshots") {
    const text = await runSnapshotsBench(command);
    writeBenchPart("snapshots", text);
    console.log(text);
  }
}

await main();
