import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  type AgentProcess,
  freePort,
  hostOnline,
  hypeman,
  REPO_ROOT,
  registerHost,
  seedTenant,
  spawnAgent,
  type TestDatabase,
  testDatabase,
  waitFor,
} from "../harness.ts";
import { clientScenario } from "./scenarios.ts";

// The Workers deployment, run locally: `wrangler dev` (workerd) with the Hyperdrive binding
// pointed at the test's Postgres database, a real sim agent connecting to its HostSession
// Durable Object over a WebSocket, and the official client's whole scenario.

const WRANGLER = path.join(REPO_ROOT, "node_modules", ".bin", "wrangler");

interface Wrangler {
  url: string;
  output(): string;
  stop(): Promise<void>;
}

async function wranglerDev(
  databaseUrl: string,
  vars: Record<string, string> = {},
): Promise<Wrangler> {
  // Hyperdrive insists on a password in the URL; the test server trusts local connections, so
  // any will do.
  const withPassword = new URL(databaseUrl);
  if (!withPassword.password) withPassword.password = "local";
  const port = await freePort();
  const inspector = await freePort();
  // Durable Object storage of this run only.
  const persist = mkdtempSync(path.join(os.tmpdir(), "offshoot-wrangler-"));
  let out = "";
  const child: ChildProcess = spawn(
    WRANGLER,
    [
      "dev",
      "--ip",
      "127.0.0.1",
      "--port",
      String(port),
      "--inspector-port",
      String(inspector),
      ...Object.entries({
        HEARTBEAT_MS: "200",
        HOST_GRACE_MS: "3000",
        COMMAND_TIMEOUT_MS: "30000",
        ...vars,
      }).flatMap(([k, v]) => ["--var", `${k}:${v}`]),
      "--persist-to",
      persist,
    ],
    {
      cwd: REPO_ROOT,
      env: {
        ...process.env,
        WRANGLER_SEND_METRICS: "false",
        CLOUDFLARE_CF_FETCH_ENABLED: "false",
        CLOUDFLARE_HYPERDRIVE_LOCAL_CONNECTION_STRING_HYPERDRIVE: withPassword.toString(),
        NO_COLOR: "1",
      },
      stdio: ["ignore", "pipe", "pipe"],
      detached: true,
    },
  );
  child.stdout?.on("data", (d: Buffer) => {
    out += d.toString();
  });
  child.stderr?.on("data", (d: Buffer) => {
    out += d.toString();
  });
  const url = `http://127.0.0.1:${port}`;
  await waitFor(
    async () => {
      if (child.exitCode !== null) throw new Error(`wrangler dev exited:\n${out}`);
      return fetch(`${url}/health`).then(
        (r) => r.ok,
        () => false,
      );
    },
    { timeoutMs: 60_000, what: `wrangler dev to answer on ${url}` },
  );
  return {
    url,
    output: () => out,
    stop: async () => {
      if (child.exitCode !== null || !child.pid) return;
      const exited = new Promise((r) => child.once("exit", r));
      process.kill(-child.pid, "SIGTERM");
      const timer = setTimeout(() => child.pid && process.kill(-child.pid, "SIGKILL"), 5_000);
      await exited;
      clearTimeout(timer);
      rmSync(persist, { recursive: true, force: true });
    },
  };
}

describe("Cloudflare Workers deployment (wrangler dev)", { timeout: 120_000 }, () => {
  let database: TestDatabase;
  let worker: Wrangler;
  let agent: AgentProcess;
  let apiKey: string;

  beforeAll(async () => {
    database = await testDatabase();
    ({ apiKey } = await seedTenant(database.database.db));
    worker = await wranglerDev(database.url);
    const { hostId, token } = await registerHost(database.database.db);
    agent = await spawnAgent({ cpUrl: worker.url, token });
    await hostOnline(database.database.db, hostId, 30_000).catch((e: unknown) => {
      throw new Error(
        `${(e as Error).message}\nworker:\n${worker.output()}\nagent:\n${agent.output()}`,
      );
    });
  }, 120_000);

  afterAll(async () => {
    await agent?.stop();
    await worker?.stop();
    await database?.drop();
  });

  it("runs the official client's scenario against the Worker and its HostSession", async () => {
    await clientScenario(hypeman(worker.url, apiKey)).catch((e: unknown) => {
      throw new Error(`${(e as Error).message}\nworker:\n${worker.output().slice(-4000)}`);
    });
  });

  it("streams logs from the agent through the Durable Object", async () => {
    const res = await fetch(`${worker.url}/instances/web-1/logs?tail=1000&source=hypeman`, {
      headers: { authorization: `Bearer ${apiKey}` },
    });
    expect(res.status).toBe(200);
    expect(await res.text()).toMatch(/^data: ".*create/m);
  });
});

// A HostSession dropped from memory mid-command. Locally the runtime does not hibernate an object
// within a test's time, so the test drops it with state.abort() (POST /__test/evict, enabled by
// SESSION_TEST_EVICT=1). That is harsher than hibernation: abort() also closes the agent's
// socket. The object has already let go of the command's request (SESSION_WAIT_MS=1000), the
// host works on a 14 s fork, the agent reconnects with the fork in flight, and the result must be
// recorded by the new instance of the object and seen by the request through Postgres.
describe("HostSession dropped mid-command (wrangler dev)", { timeout: 120_000 }, () => {
  it("records the result in a new instance of the object; the fork completes once", async () => {
    const database = await testDatabase();
    const { apiKey } = await seedTenant(database.database.db);
    const worker = await wranglerDev(database.url, {
      HEARTBEAT_MS: "60000",
      HOST_GRACE_MS: "120000",
      SESSION_WAIT_MS: "1000",
      SESSION_TEST_EVICT: "1",
    });
    const { hostId, token } = await registerHost(database.database.db);
    const agent = await spawnAgent({
      cpUrl: worker.url,
      token,
      env: { SIM_LATENCY_MS: JSON.stringify({ fork: 14_000 }) },
    });
    try {
      await hostOnline(database.database.db, hostId, 30_000);
      const client = hypeman(worker.url, apiKey);
      await client.instances.create({ name: "ev-src", image: "alpine", vcpus: 1, size: "256MB" });
      await client.instances.standby("ev-src");
      const forking = client.instances.fork("ev-src", { name: "ev-fork", target_state: "Running" });
      await waitFor(() => agent.execLog().some((l) => l.kind === "fork"), {
        what: "the fork to start on the host",
      });
      await new Promise((r) => setTimeout(r, 1500)); // the object has let go of the request
      // Evict through a test-only path of the Worker, forwarded to the host's object.
      const evict = await fetch(`${worker.url}/__test/evict/${hostId}`, { method: "POST" });
      expect(evict.status).toBe(202); // abort() throws in the object, by design
      const fork = await forking;
      expect(fork.state).toBe("Running");
      // Which instance of the object sent the command, and which recorded its result.
      const events = worker
        .output()
        .split("\n")
        .flatMap((l) => {
          const m = /\{.*"msg":"(host session loaded|result recorded)".*\}/.exec(l);
          return m
            ? [JSON.parse(m[0]) as { msg: string; incarnation: string; waiting?: boolean }]
            : [];
        });
      const results = events.filter((e) => e.msg === "result recorded");
      const last = results.at(-1);
      expect(last?.waiting, "the result found no request waiting in memory").toBe(false);
      const loaded = events
        .filter((e) => e.msg === "host session loaded")
        .map((e) => e.incarnation);
      expect(loaded.length, "the object was loaded again after the abort").toBeGreaterThan(1);
      // The agent came back with the fork still running, and said so in its hello.
      expect(agent.output()).toMatch(
        /"msg":"hello sent","instances":1,"in_flight":\["[0-9a-f-]{36}"\]/,
      );
      expect(last?.incarnation).toBe(loaded.at(-1));
      expect(agent.execLog().filter((l) => l.kind === "fork")).toHaveLength(1);
    } finally {
      await agent.stop();
      await worker.stop();
      await database.drop();
    }
  });
});
