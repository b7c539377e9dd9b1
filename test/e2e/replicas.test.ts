import { appendFileSync } from "node:fs";
import { and, eq } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { instances, operations } from "../../control-plane/src/db/schema/index.ts";
import { agentPaths } from "../../host-agent/src/paths.ts";
import { execOnce } from "../exec-client.ts";
import {
  type AgentProcess,
  api,
  type CpProcess,
  hostOnline,
  registerHost,
  seedTenant,
  spawnAgent,
  spawnControlPlane,
  sseData,
  type TestDatabase,
  testDatabase,
  waitFor,
} from "../harness.ts";

// Three control-plane replicas on one Postgres server, two agents, no sticky sessions: every
// call goes to whichever replica the test picks, never to the one holding the host's agent on
// purpose. The replicas share nothing but the database (LISTEN/NOTIFY, services/bus.ts).
describe("replicas", { timeout: 90_000 }, () => {
  let database: TestDatabase;
  let apiKey: string;
  const cps: CpProcess[] = [];
  const agents: AgentProcess[] = [];
  const hostIds: string[] = [];
  const call = (i: number) => {
    const cp = cps[i % cps.length];
    if (!cp) throw new Error("no replica");
    return api(cp.url, apiKey);
  };

  beforeAll(async () => {
    database = await testDatabase();
    ({ apiKey } = await seedTenant(database.database.db));
    for (let i = 0; i < 3; i++) {
      cps.push(
        // LOG_LEVEL=debug: a wait's "waiting for a state" line says when it is listening.
        await spawnControlPlane({
          databaseUrl: database.url,
          env: { FORK_RESUME_MS: "1000", LOG_LEVEL: "debug" },
        }),
      );
    }
    const [a, b, c] = cps.map((cp) => cp.url);
    // Agent 0 dials A first, agent 1 dials B first; each fails over to the next URL.
    for (const urls of [`${a},${b},${c}`, `${b},${c},${a}`]) {
      const { hostId, token } = await registerHost(database.database.db);
      agents.push(
        await spawnAgent({
          cpUrl: urls,
          token,
          env: { SIM_LATENCY_MS: JSON.stringify({ fork: 1500, standby: 100, restore: 100 }) },
        }),
      );
      hostIds.push(hostId);
      await hostOnline(database.database.db, hostId);
    }
  }, 120_000);

  afterAll(async () => {
    await Promise.all(agents.map((a) => a.stop()));
    await Promise.all(cps.map((cp) => cp.stop()));
    await database?.drop();
  });

  const hostOf = async (name: string) => {
    const [row] = await database.database.db
      .select({ hostId: instances.hostId, id: instances.id })
      .from(instances)
      .where(eq(instances.name, name));
    return row;
  };

  it("serves every call from every replica, whichever one holds the host's agent", async () => {
    let n = 0;
    const next = () => call(n++);
    // Replica C holds no agent: the create's command is handed to the replica that does.
    const created = await call(2)("POST", "/instances", {
      name: "r-1",
      image: "alpine",
      vcpus: 1,
      size: "256MB",
    });
    expect(created.status, JSON.stringify(created.body)).toBe(201);
    for (const [verb, want] of [
      ["standby", "Standby"],
      ["restore", "Running"],
      ["stop", "Stopped"],
      ["start", "Running"],
    ] as const) {
      const r = await next()("POST", `/instances/r-1/${verb}`);
      expect(r.status, `${verb}: ${JSON.stringify(r.body)}`).toBe(200);
      expect((r.body as { state: string }).state).toBe(want);
    }
    // A wait on one replica wakes on a change recorded by another: the change is made once
    // the wait is listening.
    const id = (created.body as { id: string }).id;
    const waiting = call(0)("GET", "/instances/r-1/wait?state=Standby&timeout=30s");
    await waitFor(
      () =>
        cps[0]
          ?.output()
          .split("\n")
          .some((l) => l.includes('"msg":"waiting for a state"') && l.includes(id)),
      { timeoutMs: 30_000, what: "replica A to be waiting for r-1" },
    );
    expect((await call(1)("POST", "/instances/r-1/standby")).status).toBe(200);
    const waited = await waiting;
    expect(waited.body).toMatchObject({ state: "Standby", timed_out: false });

    // Forks through each replica; logs relayed from the replica holding the agent.
    for (let i = 0; i < 3; i++) {
      const f = await call(i)("POST", "/instances/r-1/fork", { name: `r-1-f${i}` });
      expect(f.status, JSON.stringify(f.body)).toBe(201);
      expect((f.body as { state: string }).state).toBe("Standby");
    }
    const host = await hostOf("r-1");
    const holder = host?.hostId === hostIds[0] ? 0 : 1;
    for (const i of [0, 1, 2].filter((x) => x !== holder)) {
      const res = await fetch(`${cps[i]?.url}/instances/r-1/logs?tail=50&source=hypeman`, {
        headers: { authorization: `Bearer ${apiKey}` },
      });
      expect(res.status).toBe(200);
      const text = await res.text();
      expect(text, `logs through replica ${i}`).toMatch(/^data: ".*standby/m);
    }
    for (const name of ["r-1-f0", "r-1-f1", "r-1-f2", "r-1"]) {
      expect((await next()("DELETE", `/instances/${name}`)).status).toBe(204);
    }
  });

  it("a log of many chunks arrives whole through every replica (credits travel back over the bus)", async () => {
    const created = await call(0)("POST", "/instances", {
      name: "r-log",
      image: "alpine",
      vcpus: 1,
    });
    expect(created.status, JSON.stringify(created.body)).toBe(201);
    const row = await hostOf("r-log");
    const agent = agents[row?.hostId === hostIds[0] ? 0 : 1];
    // 3,000 lines of 1,000 characters: a dozen chunks, three times a stream's window.
    const lines = Array.from(
      { length: 3000 },
      (_, i) => `${String(i).padStart(4, "0")} ${"z".repeat(995)}`,
    );
    appendFileSync(
      agentPaths(agent?.dataDir ?? "").sim.consoleLog(row?.id ?? ""),
      `${lines.join("\n")}\n`,
    );
    for (let i = 0; i < 3; i++) {
      const res = await fetch(`${cps[i]?.url}/instances/r-log/logs?tail=3000`, {
        headers: { authorization: `Bearer ${apiKey}` },
      });
      expect(res.status).toBe(200);
      const got = sseData(await res.text());
      expect(got.length, `lines through replica ${i}`).toBe(3000);
      expect(got).toEqual(lines);
    }
    expect((await call(1)("DELETE", "/instances/r-log")).status).toBe(204);
  });

  it("execs, stats and copies through every replica: streams hop to the one holding the agent", async () => {
    const created = await call(0)("POST", "/instances", {
      name: "r-exec",
      image: "alpine",
      vcpus: 1,
    });
    expect(created.status, JSON.stringify(created.body)).toBe(201);
    for (let i = 0; i < 3; i++) {
      const url = cps[i]?.url ?? "";
      const echo = await execOnce(url, apiKey, "r-exec", { command: ["echo", `via ${i}`] });
      expect(echo, `exec through replica ${i}`).toMatchObject({ exitCode: 0, closeCode: 1000 });
      expect(echo.output.toString()).toBe(`via ${i}\n`);
      // 3 MiB through a stream window of 256 KiB: credit travels back across the hop.
      const big = await execOnce(url, apiKey, "r-exec", {
        command: ["yes", String(3 * 1024 * 1024)],
      });
      expect(big.exitCode).toBe(0);
      expect(big.output.length).toBe(3 * 1024 * 1024);
      const cat = await execOnce(
        url,
        apiKey,
        "r-exec",
        { command: ["cat"] },
        { stdin: ["in ", "out"], closeStdin: true },
      );
      expect(cat.output.toString()).toBe("in out");
      const stat = await call(i)("GET", "/instances/r-exec/stat?path=/etc");
      expect(stat.body).toMatchObject({ exists: true, is_dir: true });
    }
    expect((await call(1)("DELETE", "/instances/r-exec")).status).toBe(204);
  });

  it("kill -9 of the replica holding the agent and serving the fork: nothing lost, nothing run twice, converged", async () => {
    // On agent 0's host (connected to replica A), through replica A.
    const a = call(0);
    let src = "";
    for (let i = 0; ; i++) {
      const name = `k-src-${i}`;
      const r = await a("POST", "/instances", { name, image: "alpine", vcpus: 1, size: "256MB" });
      expect(r.status).toBe(201);
      if ((await hostOf(name))?.hostId === hostIds[0]) {
        src = name;
        break;
      }
      expect(i).toBeLessThan(5);
    }
    const agent = agents[0];
    if (!agent) throw new Error("no agent");
    const forksBefore = agent.execLog().filter((l) => l.kind === "fork").length;
    const pending = a("POST", `/instances/${src}/fork`, {
      name: "k-fork",
      from_running: true,
      target_state: "Running",
    }).catch((e: unknown) => e);
    await waitFor(() => agent.execLog().filter((l) => l.kind === "fork").length > forksBefore, {
      what: "the fork to start on the host",
    });
    await cps[0]?.kill("SIGKILL");
    const outcome = await pending;
    expect(outcome instanceof Error, "the request died with its replica").toBe(true);

    // Another replica finds the flow, the agent reconnects to replica B and delivers.
    const b = call(1);
    // (How fast is a benchmark's business: the timeout only catches a flow that never ends.)
    await waitFor(
      async () => {
        const fork = await b("GET", "/instances/k-fork");
        const source = await b("GET", `/instances/${src}`);
        const state = (x: typeof fork) => (x.body as { state?: string }).state;
        return fork.status === 200 && state(fork) === "Running" && state(source) === "Running";
      },
      { timeoutMs: 60_000, what: "fork and source Running" },
    );
    // Executed once on the host, and the flow is recorded as done.
    expect(agent.execLog().filter((l) => l.kind === "fork")).toHaveLength(forksBefore + 1);
    const target = await hostOf("k-fork");
    if (!target) throw new Error("no row for k-fork");
    const flows = await database.database.db
      .select({ status: operations.status })
      .from(operations)
      .where(and(eq(operations.instanceId, target.id), eq(operations.kind, "fork_flow")));
    expect(flows).toEqual([{ status: "succeeded" }]);
  });
});
