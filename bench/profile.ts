// `npm run bench:profile`: where a fork's time goes. Runs control plane and one sim agent in
// this process against a Postgres server, profiles the main thread during a fork loop with
// the inspector, and prints self time per package. A tool for performance work; its output
// is not written anywhere.
import { mkdtempSync } from "node:fs";
import { Session } from "node:inspector/promises";
import os from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import { openPostgres } from "../control-plane/src/db/open.ts";
import { loadEnv } from "../control-plane/src/env.ts";
import { startServer } from "../control-plane/src/server.ts";
import {
  createApiKey,
  createHost,
  ensureTenant,
} from "../control-plane/src/services/credentials.ts";
import { startAgent } from "../host-agent/src/index.ts";
import { ensurePostgres } from "../scripts/postgres.ts";
import { http, simAgentConfig } from "./sim-stack.ts";
import { summary } from "./stats.ts";

const N = Number(process.env.BENCH_FORKS ?? 300);

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string };
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

const PACKAGES = [
  "drizzle-orm",
  "postgres/src",
  "hono",
  "zod",
  "node:_http",
  "ws/lib",
  "cuid2",
  "@noble",
];
const OURS = ["control-plane/src", "host-agent/src", "shared/src"];

/** Self time per package; native and node-internal frames count for the nearest caller. */
function byPackage(p: Profile): Array<[string, number]> {
  const node = new Map(p.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const label = (n: ProfileNode): string | undefined => {
    const { url, functionName } = n.callFrame;
    if (functionName.startsWith("(")) return functionName;
    const hit = [...PACKAGES, ...OURS].find((k) => url.includes(k));
    if (hit) return hit;
    return url && !url.startsWith("node:") ? "other" : undefined;
  };
  const totals = new Map<string, number>();
  p.samples.forEach((id, i) => {
    let cur: number | undefined = id;
    let name: string | undefined;
    while (cur !== undefined) {
      name = label(node.get(cur) as ProfileNode);
      if (name) break;
      cur = parent.get(cur);
    }
    const key = name ?? "node internals";
    totals.set(key, (totals.get(key) ?? 0) + (p.timeDeltas[i] ?? 0) / 1000);
  });
  return [...totals.entries()].sort((a, b) => b[1] - a[1]);
}

const pg = process.env.BENCH_DATABASE_URL ? undefined : await ensurePostgres({ durable: true });
const serverUrl = process.env.BENCH_DATABASE_URL ?? pg?.url ?? "";
const admin = postgres(serverUrl, { max: 1, onnotice: () => {} });
await admin.unsafe("drop database if exists bench_profile with (force)");
await admin.unsafe("create database bench_profile");
await admin.end();
const url = new URL(serverUrl);
url.pathname = "/bench_profile";
const database = await openPostgres(url.toString());
const { key } = await createApiKey(database.db, await ensureTenant(database.db, "p"));
const { token } = await createHost(database.db, "h");
const cp = await startServer(
  loadEnv({ PORT: "0", HOST: "127.0.0.1", DATABASE_URL: url.toString() }),
  () => {},
  { database },
);
const agent = await startAgent(
  simAgentConfig(cp.url, token, mkdtempSync(join(os.tmpdir(), "offshoot-profile-")), "h"),
  { log: () => {} },
);
await new Promise((r) => setTimeout(r, 1000));
const call = (method: string, path: string, body?: unknown) =>
  http(cp.url, key, method, path, body);
await call("POST", "/instances", { name: "src", image: "alpine", vcpus: 1, size: "256MB" });
await call("POST", "/instances/src/standby");

const session = new Session();
session.connect();
await session.post("Profiler.enable");
await session.post("Profiler.start");
const cpu0 = process.cpuUsage();
const t0 = performance.now();
const ms: number[] = [];
for (let i = 0; i < N; i++) {
  const s = performance.now();
  const fork = await call("POST", "/instances/src/fork", { name: `f-${i}` });
  ms.push(performance.now() - s);
  if (fork) await call("DELETE", `/instances/${fork.id}`);
}
const wall = performance.now() - t0;
const cpu = process.cpuUsage(cpu0);
const { profile } = (await session.post("Profiler.stop")) as unknown as { profile: Profile };
session.disconnect();

const per = (x: number) => `${(x / N).toFixed(2)} ms`;
console.log(
  `forks: ${N}; fork p50 ${summary(ms).p50.toFixed(2)} ms (fork + delete per iteration: ${per(wall)} wall)`,
);
console.log(
  `process CPU per iteration: user ${per(cpu.user / 1000)}, system ${per(cpu.system / 1000)}`,
);
console.log("main-thread self time per iteration, by package:");
for (const [name, total] of byPackage(profile).slice(0, 14)) {
  console.log(`  ${per(total).padStart(9)}  ${name}`);
}
await agent.stop();
await cp.close();
await database.close();
await pg?.stop();
