// What a first-time user meets: room on a small host, the order errors are reported in, sizes
// a host cannot boot, Hypeman routes not served yet, the bootstrap API key, settings that are
// wrong, and `npm start` stopping as a whole.
import { execFile, spawn } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FAKE_CAPABILITIES, fakeAgent, isWelcome } from "../fake-agent.ts";
import {
  api,
  freePort,
  hostOnline,
  REPO_ROOT,
  registerHost,
  seedTenant,
  spawnControlPlane,
  tempDir,
  testDatabase,
  waitFor,
} from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

describe("a small host and the order of checks", () => {
  let stack: Stack;
  let call: ReturnType<typeof api>;
  beforeAll(async () => {
    // A 2-core host, as the machine `npm start` runs on here.
    stack = await startStack({ agents: [{ AGENT_VCPUS: "2", AGENT_MEMORY: "8GB" }] });
    call = api(stack.cp.url, stack.apiKey);
  });

  it("overcommits vCPUs (4 per core by default) but not memory, and says what is free", async () => {
    // Default creates take 2 vCPUs: four fit on 2 cores, the fifth does not.
    for (let i = 0; i < 4; i++) {
      const r = await call("POST", "/instances", { name: `w-${i}`, image: "alpine", size: "1GB" });
      expect(r.status, JSON.stringify(r.body)).toBe(201);
    }
    const full = await call("POST", "/instances", { name: "w-4", image: "alpine", size: "1GB" });
    expect(full.status).toBe(409);
    expect(full.body).toMatchObject({
      code: "insufficient_resources",
      message: expect.stringMatching(/has 0 vCPUs and 4GB free; 2 vCPUs and 1GB needed/),
    });
    // Memory is not overcommitted: 4 GiB are left, 5 GiB are not.
    expect(
      (await call("POST", "/instances", { name: "m-1", image: "alpine", vcpus: 1, size: "5GB" }))
        .body,
    ).toMatchObject({ code: "insufficient_resources" });
  });

  it("reports a taken name before anything else, as Hypeman does", async () => {
    // The host is full, yet the duplicate name is what the caller hears about.
    const dup = await call("POST", "/instances", { name: "w-0", image: "alpine" });
    expect(dup.status).toBe(409);
    expect(dup.body).toMatchObject({ code: "name_conflict" });
    expect((await call("POST", "/instances/w-0/standby")).status).toBe(200);
    const fork = await call("POST", "/instances/w-0/fork", {
      name: "w-1",
      target_state: "Running",
    });
    expect(fork.body).toMatchObject({ code: "name_conflict" });
  });

  it("answers 501 for Hypeman routes not served yet, 404 for no route at all, 401 first", async () => {
    for (const [method, p] of [
      ["PATCH", "/instances/w-0"],
      ["GET", "/instances/w-0/auto-standby/status"],
      ["POST", "/images/alpine/tag"],
      ["GET", "/builds"],
      ["POST", "/instances/w-0/volumes/vol-1"],
      ["GET", "/resources"],
      ["GET", "/capabilities"],
    ] as const) {
      const r = await call(method, p, method === "GET" ? undefined : {});
      expect(r.status, `${method} ${p}`).toBe(501);
      expect(r.body).toMatchObject({ code: "not_supported" });
    }
    expect((await call("GET", "/instances/w-0/no-such-thing")).status).toBe(404);
    expect((await api(stack.cp.url)("GET", "/snapshots")).status).toBe(401);
  });

  it("documents the query parameters of wait and logs", async () => {
    const doc = (await (await fetch(`${stack.cp.url}/openapi.json`)).json()) as {
      paths: Record<string, Record<string, { parameters?: Array<{ name: string; in: string }> }>>;
    };
    const names = (p: string) =>
      (doc.paths[p]?.get?.parameters ?? []).filter((x) => x.in === "query").map((x) => x.name);
    expect(names("/instances/{id}/wait").sort()).toEqual(["state", "timeout"]);
    expect(names("/instances/{id}/logs").sort()).toEqual(["follow", "source", "tail"]);
    const page = await (await fetch(`${stack.cp.url}/docs`)).text();
    expect(page).toContain("op.parameters");
  });
});

describe("a host's smallest guest", () => {
  it("refuses a size below what the host boots, with a 400 that says the minimum", async () => {
    const { url, database } = await testDatabase();
    const { apiKey } = await seedTenant(database.db);
    const cp = await spawnControlPlane({ databaseUrl: url });
    const host = await registerHost(database.db);
    const agent = await fakeAgent(cp.url, host.token);
    agent.hello({
      capabilities: { ...FAKE_CAPABILITIES, min_memory_bytes: 128 * 1024 * 1024 },
    });
    await agent.next(isWelcome);
    await hostOnline(database.db, host.hostId);
    const r = await api(cp.url, apiKey)("POST", "/instances", {
      name: "tiny",
      image: "alpine",
      size: "96MB",
    });
    expect(r.status).toBe(400);
    expect(r.body).toEqual({
      code: "invalid_request",
      message: "size 96MB is below the smallest guest the hosts boot (128MB)",
    });
    // Nothing was sent to the host.
    expect(agent.received.filter((m) => m.type === "command")).toEqual([]);
    agent.close();
    await cp.stop();
  });
});

describe("the bootstrap API key and wrong settings", () => {
  it("HYPEMAN_API_KEY given at start replaces the one given before", async () => {
    const { url } = await testDatabase();
    const port = await freePort();
    const k1 = "first-bootstrap-key-0001";
    const k2 = "second-bootstrap-key-002";
    const cp = await spawnControlPlane({ databaseUrl: url, port, env: { HYPEMAN_API_KEY: k1 } });
    const status = async (key: string) => (await api(cp.url, key)("GET", "/instances")).status;
    expect(await status(k1)).toBe(200);
    await cp.stop();
    const cp2 = await spawnControlPlane({ databaseUrl: url, port, env: { HYPEMAN_API_KEY: k2 } });
    expect(await status(k2)).toBe(200);
    expect(await status(k1)).toBe(401);
    await cp2.stop();
    // Given again, the first one is the key again.
    const cp3 = await spawnControlPlane({ databaseUrl: url, port, env: { HYPEMAN_API_KEY: k1 } });
    expect(await status(k1)).toBe(200);
    expect(await status(k2)).toBe(401);
    await cp3.stop();
  });

  it("a wrong setting is one line on stderr and exit code 2, not a stack trace", async () => {
    for (const script of ["control-plane/src/main.ts", "scripts/start.ts"]) {
      const r = await new Promise<{ code: number | null; stderr: string }>((resolve) =>
        execFile(
          process.execPath,
          ["--import", "tsx", script],
          {
            cwd: REPO_ROOT,
            env: { ...process.env, HYPEMAN_API_KEY: "short", DATA_DIR: tempDir() },
            encoding: "utf8",
          },
          (err, _stdout, stderr) =>
            resolve({ code: err ? (typeof err.code === "number" ? err.code : null) : 0, stderr }),
        ),
      );
      expect(r.code, script).toBe(2);
      expect(r.stderr.trimEnd().split("\n"), r.stderr).toHaveLength(1);
      expect(r.stderr).toMatch(/^offshoot: .*HYPEMAN_API_KEY must be at least 16 characters$/m);
    }
  });
});

/** Pids of the processes whose command line mentions `needle` (Linux /proc). */
function processesMentioning(needle: string): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmd = readFileSync(`/proc/${entry}/cmdline`, "utf8");
      const env = readFileSync(`/proc/${entry}/environ`, "utf8");
      if (cmd.includes(needle) || env.includes(needle)) pids.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

describe("npm start", () => {
  let dataDir: string;
  afterAll(() => {
    for (const pid of processesMentioning(dataDir ?? "\0")) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
  });

  it("stops as a whole on SIGTERM to npm, and names the guests it leaves running", async () => {
    dataDir = tempDir("offshoot-start-");
    const port = await freePort();
    const npm = spawn("npm", ["start"], {
      cwd: REPO_ROOT,
      env: {
        ...process.env,
        DATA_DIR: dataDir,
        PORT: String(port),
        HOST: "127.0.0.1",
        AGENT_DRIVER: "sim",
        HYPEMAN_API_KEY: "npm-start-test-key-0001",
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    npm.stdout.on("data", (d: Buffer) => {
      out += d.toString();
    });
    npm.stderr.on("data", (d: Buffer) => {
      out += d.toString();
    });
    const exited = new Promise<void>((r) => npm.once("exit", () => r()));
    await waitFor(() => out.includes('"msg":"ready"'), { timeoutMs: 90_000, what: "ready" });
    const call = api(`http://127.0.0.1:${port}`, "npm-start-test-key-0001");
    const created = await call("POST", "/instances", { name: "keeps-going", image: "alpine" });
    expect(created.status, JSON.stringify(created.body)).toBe(201);
    const tree = processesMentioning(dataDir);
    expect(tree.length).toBeGreaterThanOrEqual(2); // the control plane and its agent, at least

    npm.kill("SIGTERM");
    await exited;
    await waitFor(() => processesMentioning(dataDir).length === 0, {
      timeoutMs: 30_000,
      what: "every process of npm start to exit",
    });
    expect(out).toMatch(/"msg":"guests keep running after this exits.*keeps-going \(Running\)/);
    await expect(fetch(`http://127.0.0.1:${port}/health`)).rejects.toThrow();
  }, 150_000);
});
