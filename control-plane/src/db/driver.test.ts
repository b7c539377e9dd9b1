// The postgres.js driver when a connection closes under it, as patched by
// scripts/patch-postgres.ts (the root postinstall). Unpatched, the scenarios below end the
// process with an uncaught TypeError, leave a query pending for good, or hang a reconnect until
// connect_timeout: each one runs where that shows as a failure, never as a dead test worker.
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import type net from "node:net";
import path from "node:path";
import postgres from "postgres";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { postgresDriverPatched } from "../../../scripts/patch-postgres.ts";
import { outcome, withSockets } from "../../../test/driver-scenarios.ts";
import { REPO_ROOT, testDatabase } from "../../../test/harness.ts";

const SCENARIOS = path.join(REPO_ROOT, "test/driver-scenarios.ts");
const PATCH_SCRIPT = path.join(REPO_ROOT, "scripts/patch-postgres.ts");
// Only a bound on a broken run (a child stuck on a query that never settles); a passing run
// ends as soon as its scenario does.
const CHILD_LIMIT_MS = 30_000;

interface Run {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs `node --import tsx <script> …args` from the repository root and collects its output. */
function runNode(script: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--import", "tsx", script, ...args], {
      cwd: REPO_ROOT,
      env: { ...process.env, ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => {
      stdout += d.toString();
    });
    child.stderr.on("data", (d: Buffer) => {
      stderr += d.toString();
    });
    const limit = setTimeout(() => child.kill("SIGKILL"), CHILD_LIMIT_MS);
    child.once("error", reject);
    child.once("close", (code, signal) => {
      clearTimeout(limit);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

describe("postgres.js when a connection closes (scripts/patch-postgres.ts)", () => {
  let url: string;
  let drop: () => Promise<void>;
  beforeAll(async () => {
    ({ url, drop } = await testDatabase());
  });
  afterAll(() => drop());

  /** A scenario of test/driver-scenarios.ts in its own process: what it printed, or why not. */
  const scenario = async (name: string) => {
    const run = await runNode(SCENARIOS, [name], { DATABASE_URL: url });
    const last = run.stdout.trim().split("\n").at(-1) ?? "";
    const exit = run.signal ?? run.code;
    expect(exit, `exit ${exit}\n${run.stdout}\n${run.stderr}`).toBe(0);
    return JSON.parse(last) as Record<string, unknown>;
  };

  it("is installed: the copy Node imports carries the patch", () => {
    expect(postgresDriverPatched()).toBe(true);
  });

  it("patches nothing twice: running the script again leaves every copy as it is", async () => {
    // Checked first: on an unpatched install this test must not patch the driver itself.
    expect(postgresDriverPatched()).toBe(true);
    const pkg = path.dirname(
      path.dirname(path.dirname(createRequire(import.meta.url).resolve("postgres"))),
    );
    const files = ["src", "cjs/src", "cf/src"].flatMap((dir) =>
      ["connection.js", "index.js"].map((f) => path.join(pkg, dir, f)),
    );
    const digest = () =>
      files.map((f) => createHash("sha256").update(readFileSync(f)).digest("hex"));
    const before = digest();
    const run = await runNode(PATCH_SCRIPT, []);
    expect(run.code, run.stderr).toBe(0);
    expect(run.stdout.trim()).toBe(
      `patch-postgres: postgres 3.4.9 already patched (src/connection.js, src/index.js, cjs/src/connection.js, cjs/src/index.js, cf/src/connection.js, cf/src/index.js)`,
    );
    expect(digest()).toEqual(before);
    for (const f of files) expect(readFileSync(f, "utf8")).toMatch(/^\/\/ offshoot: patched/);
  });

  it("a reserved connection whose backend was terminated rejects every query after, and the process lives on", async () => {
    // Unpatched, the first query after the close is buffered for a socket that is gone, and
    // the flush throws from setImmediate: the process dies (porsager/postgres#1208).
    expect(await scenario("reserved-terminated")).toEqual({
      scenario: "reserved-terminated",
      first: "CONNECTION_CLOSED",
      second: "CONNECTION_CLOSED",
      pool: "ok",
    });
  });

  it("a reserved connection that closes fails what was queued on it, and never runs a later query on the pool's new session", async () => {
    expect(await scenario("reserved-queued")).toEqual({
      scenario: "reserved-queued",
      sleep: "CONNECTION_CLOSED",
      queued: "CONNECTION_CLOSED",
      pool: "ok",
      after: "CONNECTION_CLOSED",
      poolAgain: "ok",
    });
  });

  it("a reserve() waiting when the pool's connection closes gets that connection once it reconnects", async () => {
    expect(await scenario("reserve-waiting")).toEqual({
      scenario: "reserve-waiting",
      sleep: "CONNECTION_CLOSED",
      inside: "ok",
      pool: "ok",
    });
  });

  it("a reserve() that cannot connect fails, and the next one gets the connection", async () => {
    expect(await scenario("reserve-refused")).toEqual({
      scenario: "reserve-refused",
      first: "ECONNREFUSED",
      inside: "ok",
      pool: "ok",
    });
  });

  it("a transaction whose backend is terminated mid-statement fails, and its pool's only connection serves the next statement", async () => {
    // The control plane's transaction: the rollback after the failure used to crash the
    // process; release() then handed the dead connection back to the pool as open; and the
    // next session's first query failed with the old backend's FATAL (57P01).
    expect(await scenario("transaction-terminated")).toEqual({
      scenario: "transaction-terminated",
      transaction: "CONNECTION_CLOSED",
      after: "ok",
    });
  });

  it("a query issued between the socket's error and its close is rejected, not left pending", async () => {
    expect(await scenario("error-before-close")).toEqual({
      scenario: "error-before-close",
      statement: "TEST_RESET",
      rollback: "CONNECTION_CLOSED",
      pool: "ok",
    });
  });

  it("a statement buffered as its socket closes leaves no stale flush: the reconnect does not wait for connect_timeout", async () => {
    const sockets: net.Socket[] = [];
    const sql = postgres(url, {
      ...withSockets(url, sockets),
      max: 1,
      connect_timeout: 2,
      onnotice: () => {},
    });
    try {
      await sql`select 1`;
      // Inside a setImmediate callback the statement's flush is scheduled for the next turn of
      // the event loop, while the destroyed socket's 'close' comes in this turn: the
      // connection closes with the flush still pending.
      const lost = await new Promise<string>((resolve) => {
        setImmediate(() => {
          void outcome(sql`select 2`).then(resolve);
          sockets[0]?.destroy();
        });
      });
      expect(lost).toBe("CONNECTION_CLOSED");
      // Unpatched, the stale timer keeps the reconnect's StartupMessage unsent: CONNECT_TIMEOUT.
      expect(await outcome(sql`select 3`)).toBe("ok");
      expect(sockets).toHaveLength(2);
    } finally {
      await sql.end({ timeout: 1 });
    }
  });
});
