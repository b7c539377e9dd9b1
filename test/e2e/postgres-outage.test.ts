// The control plane against a Postgres server that goes away under load: its backends are
// terminated, it restarts (fast and immediate), it stays down for a while. The process must
// live through all of it, answer 503 database_unavailable quickly while the database is away,
// recover by itself, and leave nothing duplicated or pending once it is back.
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { count, eq } from "drizzle-orm";
import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Database } from "../../control-plane/src/db/client.ts";
import { openPostgres } from "../../control-plane/src/db/open.ts";
import { instances, operations } from "../../control-plane/src/db/schema/index.ts";
import { ensurePostgres, type PostgresServer } from "../../scripts/postgres.ts";
import {
  type AgentProcess,
  type ApiResponse,
  api,
  type CpProcess,
  hostOnline,
  registerHost,
  seedTenant,
  spawnAgent,
  spawnControlPlane,
  waitFor,
} from "../harness.ts";

const COMMAND_TIMEOUT_MS = 10_000;
const simInstances = (dataDir: string) => {
  const dir = join(dataDir, "sim", "instances");
  return existsSync(dir) ? readdirSync(dir) : [];
};
/** What "quickly" means while the database is down: no request hangs (they take milliseconds). */
const DOWN_ANSWER_MS = 8_000;

interface Outcome {
  what: string;
  status: number;
  ms: number;
  phase: string;
  body: unknown;
}

/** Bounded concurrent load: creates, forks, gets, lists and deletes, until stopped. */
class Load {
  readonly outcomes: Outcome[] = [];
  phase = "steady";
  /** Requests not answered yet, by the phase they started in. */
  private readonly pending = new Map<string, number>();
  private stopped = false;
  private done: Promise<void> = Promise.resolve();

  constructor(
    private call: (method: string, path: string, body?: unknown) => Promise<ApiResponse>,
    private source: string,
  ) {}

  start(workers: number): void {
    this.done = Promise.all(Array.from({ length: workers }, (_, w) => this.worker(w))).then(
      () => {},
    );
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.done;
  }

  /** Resolves once no request started in `phase` is waiting for its answer. */
  async settled(phase: string): Promise<void> {
    await waitFor(() => !this.pending.get(phase), {
      timeoutMs: 60_000,
      what: `the requests started while ${phase} to be answered`,
    });
  }

  /** Outcomes since `from`, by status. */
  since(from: number): Outcome[] {
    return this.outcomes.slice(from);
  }

  private async one(what: string, method: string, path: string, body?: unknown) {
    const phase = this.phase;
    const t0 = Date.now();
    this.pending.set(phase, (this.pending.get(phase) ?? 0) + 1);
    let r: ApiResponse;
    try {
      r = await this.call(method, path, body);
    } catch (e) {
      // The control plane did not answer at all (its process died, say).
      r = { status: 0, body: String(e), headers: new Headers() };
    } finally {
      this.pending.set(phase, (this.pending.get(phase) ?? 1) - 1);
    }
    this.outcomes.push({ what, status: r.status, ms: Date.now() - t0, phase, body: r.body });
    return r;
  }

  private async worker(w: number): Promise<void> {
    for (let i = 0; !this.stopped; i++) {
      const name = `l-${w}-${i}`;
      await this.one("create", "POST", "/instances", {
        name,
        image: "alpine",
        vcpus: 1,
        size: "64MB",
      });
      await this.one("fork", "POST", `/instances/${this.source}/fork`, { name: `f-${w}-${i}` });
      await this.one("get", "GET", `/instances/${this.source}`);
      await this.one("list", "GET", "/instances?state=Running");
      await this.one("delete", "DELETE", `/instances/${name}`);
      await this.one("delete", "DELETE", `/instances/f-${w}-${i}`);
    }
  }
}

describe("Postgres outages under load", () => {
  let pg: PostgresServer;
  let database: Database;
  let cp: CpProcess;
  let agent: AgentProcess;
  let hostId: string;
  let call: ReturnType<typeof api>;
  let load: Load;
  const health = async () => (await fetch(`${cp.url}/health`)).status;

  beforeAll(async () => {
    // Durable, as in production: an immediate restart is a crash, and a server that skips its
    // flushes would forget commits it had confirmed.
    pg = await ensurePostgres({ durable: true });
    database = await openPostgres(pg.url, { max: 2 });
    const { apiKey } = await seedTenant(database.db);
    const host = await registerHost(database.db);
    hostId = host.hostId;
    cp = await spawnControlPlane({
      databaseUrl: pg.url,
      env: { COMMAND_TIMEOUT_MS: String(COMMAND_TIMEOUT_MS) },
    });
    agent = await spawnAgent({
      cpUrl: cp.url,
      token: host.token,
      env: { SIM_LATENCY_MS: "20", AGENT_VCPUS: "4096" },
    });
    await hostOnline(database.db, hostId);
    call = api(cp.url, apiKey);
    const src = await call("POST", "/instances", { name: "src", image: "alpine", vcpus: 1 });
    expect(src.status, JSON.stringify(src.body)).toBe(201);
    expect((await call("POST", "/instances/src/standby")).status).toBe(200);
    load = new Load(call, "src");
    load.start(4);
  }, 120_000);

  afterAll(async () => {
    await load?.stop();
    await agent?.stop();
    await cp?.stop();
    await database?.close();
    await pg?.stop();
  });

  /** The control plane is still the process it was, and serving again. */
  async function recovered(phase: string) {
    load.phase = `after ${phase}`;
    const from = load.outcomes.length;
    await waitFor(async () => (await health()) === 200, {
      timeoutMs: 30_000,
      what: "/health to report the database up",
    });
    // Every kind of request succeeds again.
    await waitFor(
      () => {
        const ok = new Set(
          load
            .since(from)
            .filter((o) => o.status >= 200 && o.status < 300)
            .map((o) => o.what),
        );
        return ["create", "fork", "get", "list", "delete"].every((w) => ok.has(w));
      },
      { timeoutMs: 60_000, what: `every kind of request to succeed after ${phase}` },
    );
    expect(() => process.kill(cp.pid, 0)).not.toThrow();
    load.phase = "steady";
  }

  /** Lets the load run until it has made `n` more requests. */
  const requests = (n: number) => {
    const target = load.outcomes.length + n;
    return waitFor(() => load.outcomes.length >= target, {
      timeoutMs: 60_000,
      what: `${n} more requests`,
    });
  };

  it("survives its backends being terminated", async () => {
    await requests(20);
    load.phase = "terminate";
    const admin = postgres(pg.url, { max: 1, onnotice: () => {} });
    try {
      const killed = await admin`
        select pg_terminate_backend(pid) as ok from pg_stat_activity
        where datname = current_database() and pid <> pg_backend_pid()
          and backend_type = 'client backend'`;
      expect(killed.length).toBeGreaterThan(0);
    } finally {
      await admin.end({ timeout: 1 });
    }
    await recovered("terminate");
  });

  it.each(["fast", "immediate"] as const)("survives a restart -m %s", async (mode) => {
    await requests(20);
    load.phase = `restart ${mode}`;
    pg.restart(mode);
    await recovered(`restart ${mode}`);
  });

  it("answers 503 quickly while the database is down, and says so at /health", async () => {
    await requests(20);
    pg.halt("fast");
    load.phase = "down";
    const from = load.outcomes.length;
    try {
      // Requests made while it is down: answered, 503, quickly.
      await waitFor(() => load.since(from).length >= 20, {
        timeoutMs: 60_000,
        what: "requests while the database is down",
      });
      const h = await fetch(`${cp.url}/health`);
      expect(h.status).toBe(503);
      expect(await h.json()).toEqual({ status: "unavailable", database: "down" });
    } finally {
      load.phase = "resuming";
      // Every request made while it was down is answered before it comes back (one still
      // waiting when it returned would be served, not refused).
      await load.settled("down");
      await pg.resume();
    }
    const down = load.since(from).filter((o) => o.phase === "down");
    expect(down.length).toBeGreaterThanOrEqual(20);
    // The first few may have been in flight as it went down; the rest found it down.
    for (const o of down.slice(5)) {
      expect(o.status, `${o.what}: ${JSON.stringify(o.body)}`).toBe(503);
      expect(o.body).toMatchObject({ code: "database_unavailable" });
    }
    for (const o of down) expect(o.ms, o.what).toBeLessThan(DOWN_ANSWER_MS);
    await recovered("down");
  });

  it("afterwards: every answer was a success or a 503, none outlived its timeout, and state converged with nothing duplicated or left pending", async () => {
    await load.stop();
    // A delete may find its instance never made (its create answered 503) or still being made.
    const unexpected = load.outcomes.filter(
      (o) =>
        ![200, 201, 204, 503].includes(o.status) &&
        !(o.what === "delete" && [404, 409].includes(o.status)),
    );
    expect(
      unexpected.map((o) => `${o.phase} ${o.what} ${o.status} ${JSON.stringify(o.body)}`),
    ).toEqual([]);
    expect(Math.max(...load.outcomes.map((o) => o.ms))).toBeLessThan(COMMAND_TIMEOUT_MS + 2_000);
    expect(load.outcomes.filter((o) => o.status === 503).length).toBeGreaterThan(0);

    // Everything recorded is carried out: no operation stays pending…
    const pending = async () =>
      (
        await database.db
          .select({ n: count() })
          .from(operations)
          .where(eq(operations.status, "pending"))
      )[0]?.n;
    await waitFor(async () => (await pending()) === 0, {
      timeoutMs: 60_000,
      what: "no pending operation",
    });
    // …the host runs exactly the instances the database has, none Unknown…
    const rows = await database.db
      .select({ id: instances.id, state: instances.state })
      .from(instances);
    expect(rows.filter((r) => r.state === "Unknown")).toEqual([]);
    const inDb = rows.map((r) => r.id).sort();
    // Orphans on the host (a create rolled back meanwhile) are deleted by its next hello.
    await waitFor(() => simInstances(agent.dataDir).sort().join() === inDb.join(), {
      what: "the host's instances to match the database",
    }).catch(() => {});
    expect(simInstances(agent.dataDir).sort()).toEqual(inDb);
    // …and no command ran twice.
    const ids = agent.execLog().map((l) => l.command_id);
    expect(ids.length).toBeGreaterThan(0);
    expect(ids.length - new Set(ids).size).toBe(0);
    // Nothing escaped as an unhandled rejection or exception.
    expect(cp.output()).not.toMatch(/unhandled|uncaught|TypeError/i);
  });
});
