import { type ChildProcess, spawn } from "node:child_process";
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

async function wranglerDev(databaseUrl: string): Promise<Wrangler> {
  // Hyperdrive insists on a password in the URL; the test server trusts local connections, so
  // any will do.
  const withPassword = new URL(databaseUrl);
  if (!withPassword.password) withPassword.password = "local";
  const port = await freePort();
  const inspector = await freePort();
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
      "--var",
      "HEARTBEAT_MS:200",
      "--var",
      "HOST_GRACE_MS:3000",
      "--var",
      "COMMAND_TIMEOUT_MS:30000",
      "--persist-to",
      path.join(REPO_ROOT, ".data", `wrangler-test-${port}`),
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
