// Exec and cp benchmarks with a real QEMU guest (TCG): a control-plane process, a QEMU agent
// process connected to it over its WebSocket, one guest. `BENCH_ONLY=exec npm run bench`.
// Figures are reported, never asserted.
//
// (1) exec round trip of `true`: a WebSocket client through the control plane (client → control
//     plane → the agent's socket → the guest agent's port and back), against a direct
//     connection to the guest agent from the host (what the agent itself does), interleaved —
//     on two guests alike, since a guest's agent port takes one connection at a time;
// (2) 100 MiB copied into and out of the guest with the official client's cpToInstance and
//     cpFromInstance through the control plane, against the same bytes through a direct
//     connection (`cat` in the guest), interleaved;
// (3) with the sim driver's simulated guest (no VM: the relays alone), two replicas and the
//     Worker: exec round trips and 3 MiB of output through the replica holding the agent,
//     through the other one (a hop), and through the Worker; and 3 MiB of log lines through
//     each replica, the other one's relayed over Postgres NOTIFY (how logs cross replicas), to
//     weigh a hop against a NOTIFY relay for bulk data.
import { randomBytes } from "node:crypto";
import { appendFileSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { cpFromInstance, cpToInstance } from "@onkernel/hypeman/lib/cp";
import { GuestLink } from "../host-agent/src/guest/link.ts";
import { startAgent } from "../host-agent/src/index.ts";
import { agentPaths } from "../host-agent/src/paths.ts";
import { TestNamespaces } from "../host-agent/testing/netns.ts";
import { killGuestsUnder } from "../host-agent/testing/qemu.ts";
import { TEST_IMAGE } from "../scripts/oci-image.ts";
import { ensurePostgres } from "../scripts/postgres.ts";
import { ensureVmAssets } from "../scripts/vm-assets.ts";
import { qemuAgentEnv } from "../test/e2e/env.ts";
import { execOnce } from "../test/exec-client.ts";
import { spawnAgent, spawnControlPlane } from "../test/harness.ts";
import { wranglerDev } from "../test/wrangler.ts";
import { benchDatabase, http, simAgentConfig, waitOnline } from "./sim-stack.ts";
import { percentile } from "./stats.ts";

const ROUND_TRIPS = Number(process.env.BENCH_EXEC_N ?? 200);
const WARMUP = 10;
const COPY_BYTES = 100 * 1024 * 1024;
const COPY_RUNS = 2;

const ms = (x: number) => `${x.toFixed(1)} ms`;
const rate = (bytes: number, msTaken: number) =>
  `${(bytes / 1024 / 1024 / (msTaken / 1000)).toFixed(1)} MiB/s`;

/** One command through a direct connection to the guest agent, to its end. */
function direct(
  link: GuestLink,
  command: string[],
  stdin?: Buffer,
): Promise<{ code: number; bytes: number }> {
  return new Promise((resolve) => {
    let bytes = 0;
    const session = link.exec(
      { command, env: {}, cwd: null, tty: false, rows: 0, cols: 0, timeout: 0 },
      {
        output: (data) => {
          bytes += data.length;
          session.credit(data.length);
        },
        end: (e) => resolve({ code: e.code, bytes }),
      },
    );
    if (stdin) {
      void (async () => {
        for (let i = 0; i < stdin.length; i += 1024 * 1024) {
          await session.write(stdin.subarray(i, i + 1024 * 1024));
        }
        session.closeStdin();
      })();
    }
  });
}

async function timed<T>(fn: () => Promise<T>): Promise<[number, T]> {
  const t0 = performance.now();
  const out = await fn();
  return [performance.now() - t0, out];
}

export async function runExecBench(command: string): Promise<string> {
  await ensureVmAssets();
  const pg = process.env.BENCH_DATABASE_URL ? undefined : await ensurePostgres({ durable: true });
  const serverUrl = process.env.BENCH_DATABASE_URL ?? pg?.url ?? "";
  const log = (m: string) => console.error(`[bench:exec] ${m}`);
  const spaces = new TestNamespaces();
  const work = mkdtempSync(path.join(os.tmpdir(), "bench-exec-"));
  const db = await benchDatabase(serverUrl, "bench_exec");
  const cp = await spawnControlPlane({ databaseUrl: db.url });
  const agent = await spawnAgent({
    cpUrl: cp.url,
    token: db.token,
    env: qemuAgentEnv({ AGENT_NETNS: await spaces.create("bench") }),
  });
  try {
    // Two guests alike: "bx" is reached through the control plane, "by" directly (a guest's
    // agent port takes one connection at a time, and the agent holds bx's).
    const create = async (name: string) => {
      for (let tries = 0; ; tries++) {
        // Refused until the agent is online with its image.
        const created = await http(cp.url, db.key, "POST", "/instances", {
          name,
          image: TEST_IMAGE,
          size: "256MB",
          vcpus: 1,
          overlay_size: "1GB",
        }).catch((e: unknown) => {
          if (tries > 150) throw e;
          return new Promise<undefined>((r) => setTimeout(() => r(undefined), 200));
        });
        if (created) return String(created.id);
      }
    };
    await create("bx");
    const directId = await create("by");
    const link = new GuestLink(agentPaths(agent.dataDir).qemu.agentSocket(directId));
    await link.ready;
    log("guest running");

    // (1) round trips, interleaved
    const viaCp: number[] = [];
    const viaLink: number[] = [];
    for (let i = 0; i < ROUND_TRIPS + WARMUP; i++) {
      const [a, r] = await timed(() => execOnce(cp.url, db.key, "bx", { command: ["true"] }));
      const [b, d] = await timed(() => direct(link, ["true"]));
      if (r.exitCode !== 0 || d.code !== 0) throw new Error("`true` failed");
      if (i >= WARMUP) {
        viaCp.push(a);
        viaLink.push(b);
      }
    }
    log("round trips done");

    // (2) 100 MiB in and out, interleaved
    const local = path.join(work, "big");
    const bytes = randomBytes(COPY_BYTES);
    writeFileSync(local, bytes);
    const cfg = { baseURL: cp.url, apiKey: db.key };
    const copies = {
      cpIn: [] as number[],
      cpOut: [] as number[],
      linkIn: [] as number[],
      linkOut: [] as number[],
    };
    for (let run = 0; run < COPY_RUNS; run++) {
      const [cpIn] = await timed(() =>
        cpToInstance(cfg, { instanceId: "bx", srcPath: local, dstPath: "/root/big" }),
      );
      const out = path.join(work, `out-${run}`);
      const [cpOut] = await timed(() =>
        cpFromInstance(cfg, { instanceId: "bx", srcPath: "/root/big", dstPath: out }).catch(
          (e: unknown) => {
            log(`cp from failed: ${e}\nagent:\n${agent.output().slice(-4000)}`);
            throw e;
          },
        ),
      );
      if (statSync(path.join(out, "big")).size !== COPY_BYTES)
        throw new Error("cp from: short copy");
      rmSync(out, { recursive: true, force: true });
      const [linkIn, wrote] = await timed(() =>
        direct(link, ["sh", "-c", "cat > /root/big2"], bytes),
      );
      const [linkOut, read] = await timed(() => direct(link, ["cat", "/root/big2"]));
      if (wrote.code !== 0 || read.bytes !== COPY_BYTES) throw new Error("direct copy failed");
      copies.cpIn.push(cpIn);
      copies.cpOut.push(cpOut);
      copies.linkIn.push(linkIn);
      copies.linkOut.push(linkOut);
      log(`copy run ${run + 1} done`);
    }
    link.close("done");
    const relays = await benchRelays(serverUrl, work, log);

    const p = (xs: number[], q: number) => percentile(xs, q);
    const med = (xs: number[]) => percentile(xs, 50);
    return [
      "### Exec and cp (QEMU guest, TCG)",
      "",
      `\`${command}\`, ${new Date().toISOString().slice(0, 10)}. Two guests alike (256 MiB, 1 vCPU), one reached through the control plane, one directly (a guest's agent port takes one connection at a time); the control plane and a QEMU agent are processes on this machine, the client is the benchmark process. Interleaved, side by side.`,
      "",
      "| exec `true`, round trip | p50 | p99 | n |",
      "|---|---|---|---|",
      `| through the control plane (WebSocket client → control plane → agent socket → guest) | ${ms(p(viaCp, 50))} | ${ms(p(viaCp, 99))} | ${viaCp.length} |`,
      `| direct to the guest agent (from the host) | ${ms(p(viaLink, 50))} | ${ms(p(viaLink, 99))} | ${viaLink.length} |`,
      "",
      `| 100 MiB | through the control plane (official client's cp) | direct to the guest agent (\`cat\`) | through ÷ direct |`,
      "|---|---|---|---|",
      `| into the guest | ${rate(COPY_BYTES, med(copies.cpIn))} | ${rate(COPY_BYTES, med(copies.linkIn))} | ${(med(copies.linkIn) / med(copies.cpIn)).toFixed(2)} |`,
      `| out of the guest | ${rate(COPY_BYTES, med(copies.cpOut))} | ${rate(COPY_BYTES, med(copies.linkOut))} | ${(med(copies.linkOut) / med(copies.cpOut)).toFixed(2)} |`,
      "",
      `Medians of ${COPY_RUNS} runs each.`,
      relays,
    ].join("\n");
  } finally {
    await agent.stop();
    await cp.stop();
    await killGuestsUnder(agent.dataDir);
    await spaces.cleanup();
    rmSync(work, { recursive: true, force: true });
    await pg?.stop();
  }
}

const RELAY_TRIPS = Number(process.env.BENCH_RELAY_N ?? 200);
const RELAY_BYTES = 3 * 1024 * 1024;
const RELAY_RUNS = 3;

/** (3): the relays, with the sim's simulated guest. */
async function benchRelays(serverUrl: string, root: string, log: (m: string) => void) {
  const db = await benchDatabase(serverUrl, "bench_relays");
  const env = { HEARTBEAT_MS: "5000", HOST_GRACE_MS: "15000" };
  const a = await spawnControlPlane({ databaseUrl: db.url, env });
  const b = await spawnControlPlane({ databaseUrl: db.url, env });
  const cfg = simAgentConfig(a.url, db.token, path.join(root, "relay-agent"), "bench-host");
  const agent = await startAgent(cfg, { log: () => {} });
  const trips = { a: [] as number[], b: [] as number[], w: [] as number[] };
  const bulk = {
    execA: [] as number[],
    execB: [] as number[],
    logA: [] as number[],
    logB: [] as number[],
  };
  try {
    await waitOnline(a.url, db.key);
    const inst = await http(a.url, db.key, "POST", "/instances", {
      name: "rs",
      image: "alpine",
      vcpus: 1,
      size: "256MB",
    });
    for (let i = 0; i < RELAY_TRIPS + WARMUP; i++) {
      const [ta] = await timed(() => execOnce(a.url, db.key, "rs", { command: ["true"] }));
      const [tb] = await timed(() => execOnce(b.url, db.key, "rs", { command: ["true"] }));
      if (i >= WARMUP) {
        trips.a.push(ta);
        trips.b.push(tb);
      }
    }
    // 1 KiB console lines, as many bytes as the exec output.
    const line = "x".repeat(1023);
    appendFileSync(
      agentPaths(cfg.dataDir, cfg.sim.stateDir).sim.consoleLog(String(inst?.id)),
      `${Array.from({ length: RELAY_BYTES / 1024 }, () => line).join("\n")}\n`,
    );
    const logs = async (base: string) => {
      const res = await fetch(`${base}/instances/rs/logs?tail=${RELAY_BYTES / 1024}`, {
        headers: { authorization: `Bearer ${db.key}` },
      });
      const text = await res.text();
      if (text.length < RELAY_BYTES) throw new Error(`logs: ${text.length} characters`);
    };
    for (let run = 0; run < RELAY_RUNS; run++) {
      for (const [key, base] of [
        ["execA", a.url],
        ["execB", b.url],
      ] as const) {
        const [t, r] = await timed(() =>
          execOnce(base, db.key, "rs", { command: ["yes", String(RELAY_BYTES)] }),
        );
        if (r.output.length !== RELAY_BYTES) throw new Error("exec output short");
        bulk[key].push(t);
      }
      bulk.logA.push((await timed(() => logs(a.url)))[0]);
      bulk.logB.push((await timed(() => logs(b.url)))[0]);
    }
    log("relays through replicas done");
  } finally {
    await agent.stop();
    await a.stop();
    await b.stop();
  }
  const wdb = await benchDatabase(serverUrl, "bench_relays_workers");
  const worker = await wranglerDev(wdb.url, env);
  const wagent = await startAgent(
    simAgentConfig(worker.url, wdb.token, path.join(root, "relay-wagent"), "bench-host"),
    { log: () => {} },
  );
  try {
    await waitOnline(worker.url, wdb.key);
    await http(worker.url, wdb.key, "POST", "/instances", {
      name: "rs",
      image: "alpine",
      vcpus: 1,
      size: "256MB",
    });
    for (let i = 0; i < RELAY_TRIPS + WARMUP; i++) {
      const [t] = await timed(() => execOnce(worker.url, wdb.key, "rs", { command: ["true"] }));
      if (i >= WARMUP) trips.w.push(t);
    }
    log("relays through the Worker done");
  } finally {
    await wagent.stop();
    await worker.stop();
  }
  const p = (xs: number[], q: number) => percentile(xs, q);
  const mbps = (xs: number[]) => rate(RELAY_BYTES, percentile(xs, 50));
  return [
    "",
    "#### The relays (sim driver's simulated guest: no VM)",
    "",
    `Two Node replicas on one Postgres server, one sim agent connected to A; then the Worker under \`wrangler dev\`. Exec round trips interleaved A/B (${RELAY_TRIPS} each after ${WARMUP} warm-up), then ${RELAY_TRIPS} through the Worker; ${RELAY_BYTES / 1024 / 1024} MiB transfers, medians of ${RELAY_RUNS}.`,
    "",
    "| exec `true`, round trip | p50 | p99 |",
    "|---|---|---|",
    `| through the agent's replica (A) | ${ms(p(trips.a, 50))} | ${ms(p(trips.a, 99))} |`,
    `| through the other replica (B: a hop to A) | ${ms(p(trips.b, 50))} | ${ms(p(trips.b, 99))} |`,
    `| through the Worker (a hop to the HostSession) | ${ms(p(trips.w, 50))} | ${ms(p(trips.w, 99))} |`,
    "",
    `| ${RELAY_BYTES / 1024 / 1024} MiB to the client | through A | through B |`,
    "|---|---|---|",
    `| exec output (B: the hop, a WebSocket to A) | ${mbps(bulk.execA)} | ${mbps(bulk.execB)} |`,
    `| log lines (B: relayed over NOTIFY, as logs cross replicas) | ${mbps(bulk.logA)} | ${mbps(bulk.logB)} |`,
  ].join("\n");
}
