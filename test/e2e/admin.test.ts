import { type ChildProcess, execFile, spawn } from "node:child_process";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openPglite, PgliteInUseError } from "../../control-plane/src/db/open.ts";
import {
  api,
  freePort,
  hostOnline,
  REPO_ROOT,
  spawnAgent,
  spawnControlPlane,
  tempDir,
  testDatabase,
  waitFor,
} from "../harness.ts";

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** `npm run admin -- …args` as a process, whatever its exit code. */
function runAdmin(args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ["--import", "tsx", "control-plane/src/admin.ts", ...args],
      { cwd: REPO_ROOT, env, encoding: "utf8", maxBuffer: 16 * 1024 * 1024 },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === "number" ? err.code : null) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

/** The environment without DATABASE_URL: the embedded database under DATA_DIR. */
function embeddedEnv(dataDir: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, DATA_DIR: dataDir };
  delete env.DATABASE_URL;
  return env;
}

/** An error as the CLI must report it: one line on stderr, nothing on stdout, no stack. */
function expectOneLineError(r: Run, message: RegExp): void {
  expect(r.code, r.stderr).toBe(1);
  expect(r.stdout).toBe("");
  expect(r.stderr.trimEnd().split("\n"), r.stderr.slice(0, 2000)).toHaveLength(1);
  expect(r.stderr).toMatch(message);
  expect(r.stderr).not.toMatch(/^\s+at /m);
}

const USAGE = /^usage: npm run admin -- <command>$/m;

// The admin CLI against a real Postgres server, and what it makes used for real.
describe("admin CLI", () => {
  let database: Awaited<ReturnType<typeof testDatabase>>;
  const env = () => ({ ...process.env, DATABASE_URL: database.url });
  /** Runs a command that must succeed; returns its stdout. */
  const admin = async (...args: string[]) => {
    const r = await runAdmin(args, env());
    expect(r.code, `admin ${args.join(" ")}: ${r.stderr}`).toBe(0);
    return r.stdout;
  };
  beforeAll(async () => {
    database = await testDatabase();
  });
  afterAll(async () => {
    await database.drop();
  });

  it("creates a tenant, a key and a host token that the server and an agent accept", async () => {
    expect(JSON.parse(await admin("tenant", "create", "acme"))).toMatchObject({ name: "acme" });
    const { api_key: key, key_id: keyId } = JSON.parse(
      await admin("key", "create", "acme", "--name", "ci"),
    );
    expect(key).toMatch(/^osk_/);
    const { host_token: token, host_id: hostId } = JSON.parse(
      await admin("host", "create", "rack1"),
    );
    expect(token).toMatch(/^oht_/);

    // A short key cache, so that the revocation below is seen soon after it is made.
    const cp = await spawnControlPlane({
      databaseUrl: database.url,
      env: { API_KEY_CACHE_MS: "200" },
    });
    const agent = await spawnAgent({ cpUrl: cp.url, token });
    await hostOnline(database.database.db, hostId);
    const call = api(cp.url, key);
    const r = await call("POST", "/instances", {
      name: "a1",
      image: "alpine",
      vcpus: 1,
      size: "256MB",
    });
    expect(r.status, JSON.stringify(r.body)).toBe(201);
    expect(await admin("host", "list")).toContain('"status":"online"');

    // Only the hash is stored: the key itself appears nowhere in the database.
    const rows = await database.database.db.execute(
      `select key_hash, prefix from api_keys` as never,
    );
    expect(JSON.stringify(rows)).not.toContain(key);

    // A revoked key stops working once the server's positive cache has let go of it.
    expect(JSON.parse(await admin("key", "revoke", keyId))).toEqual({
      key_id: keyId,
      revoked: true,
    });
    await waitFor(async () => (await call("GET", "/instances")).status === 401, {
      timeoutMs: 30_000,
      what: "the revoked key to be refused",
    });
    expect((await call("GET", "/instances")).body).toMatchObject({ code: "unauthorized" });
    await agent.stop();
    await cp.stop();
  });

  it("refuses unknown commands and missing arguments with usage (exit 2)", async () => {
    for (const args of [["frobnicate", "now"], ["tenant"], ["key", "create"], []]) {
      const r = await runAdmin(args, env());
      expect(r.code, args.join(" ")).toBe(2);
      expect(r.stderr, args.join(" ")).toMatch(USAGE);
      expect(r.stderr).not.toMatch(/^\s+at /m);
    }
    expectOneLineError(
      await runAdmin(["key", "create", "no-such-tenant"], env()),
      /no tenant named no-such-tenant/,
    );
  });

  it("prints its usage for --help, -h and help, and exits 0", async () => {
    for (const args of [["--help"], ["-h"], ["help"], ["tenant", "list", "--help"]]) {
      const r = await runAdmin(args, env());
      expect(r.code, `${args.join(" ")}: ${r.stderr}`).toBe(0);
      expect(r.stdout).toMatch(USAGE);
      expect(r.stdout).toContain("key create <tenant> [--name N]");
      expect(r.stderr).toBe("");
    }
  });

  it("answers an unknown flag, or one missing its value, with the reason and usage (exit 2)", async () => {
    for (const [args, reason] of [
      [["--frobnicate"], /Unknown option '--frobnicate'/],
      [["tenant", "list", "-x"], /Unknown option '-x'/],
      [["key", "create", "acme", "--name"], /--name <value>' argument missing/],
    ] as const) {
      const r = await runAdmin([...args], env());
      expect(r.code, `${args.join(" ")}: ${r.stderr}`).toBe(2);
      expect(r.stderr.split("\n")[0]).toMatch(reason);
      expect(r.stderr).toMatch(USAGE);
      expect(r.stderr).not.toMatch(/^\s+at /m);
      expect(r.stdout).toBe("");
    }
  });

  it("reports any failure in one line, without a stack trace (exit 1)", async () => {
    const port = await freePort(); // nothing listens there
    const noServer = `postgres://postgres@127.0.0.1:${port}/offshoot`;
    expectOneLineError(
      await runAdmin(["tenant", "list"], { ...process.env, DATABASE_URL: noServer }),
      /^admin: .*ECONNREFUSED/,
    );
    const noDatabase = new URL(database.url);
    noDatabase.pathname = "/no_such_database";
    expectOneLineError(
      await runAdmin(["tenant", "list"], { ...process.env, DATABASE_URL: noDatabase.toString() }),
      /^admin: .*no_such_database/,
    );
    expectOneLineError(
      await runAdmin(["tenant", "list"], { ...process.env, DATABASE_URL: "not a url" }),
      /^admin: invalid environment: DATABASE_URL/,
    );
  });
});

describe("admin CLI on the embedded database", () => {
  /** The control plane on PGlite under `dataDir` (no DATABASE_URL), as `npm start` runs it. */
  async function controlPlaneOnPglite(dataDir: string): Promise<ChildProcess> {
    const child = spawn(process.execPath, ["--import", "tsx", "control-plane/src/main.ts"], {
      cwd: REPO_ROOT,
      env: { ...embeddedEnv(dataDir), PORT: String(await freePort()), HOST: "127.0.0.1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout?.on("data", (d) => {
      output += String(d);
    });
    child.stderr?.on("data", (d) => {
      output += String(d);
    });
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    await Promise.race([
      waitFor(() => output.includes('"msg":"listening"'), {
        timeoutMs: 60_000,
        what: "the control plane to listen",
      }),
      exited.then(() => {
        throw new Error(`the control plane exited:\n${output}`);
      }),
    ]);
    return child;
  }

  it("says in one line that a running control plane holds it; a holder killed with -9 does not block it", async () => {
    const dataDir = tempDir("offshoot-admin-");
    const cp = await controlPlaneOnPglite(dataDir);
    const exited = new Promise((resolve) => cp.once("exit", resolve));
    try {
      const held = await runAdmin(["tenant", "list"], embeddedEnv(dataDir));
      expectOneLineError(
        held,
        /^admin: the embedded database under .*pglite is in use by another process \(pid \d+; npm start\?\); stop it first, or set DATABASE_URL$/m,
      );
      expect(held.stderr).toContain(`(pid ${cp.pid};`);
      expect(held.stderr).toContain(path.join(dataDir, "pglite"));
    } finally {
      cp.kill("SIGKILL");
      await exited;
    }
    // Its lock names a process that is gone: taken over. The control plane made the default
    // tenant, so the database is the one it used.
    const after = await runAdmin(["tenant", "list"], embeddedEnv(dataDir));
    expect(after.code, after.stderr).toBe(0);
    expect(after.stdout).toContain('"name":"default"');
    const again = await runAdmin(["tenant", "create", "acme"], embeddedEnv(dataDir));
    expect(again.code, again.stderr).toBe(0);
  });

  it("is held by one opener at a time, and let go on close", async () => {
    const dir = path.join(tempDir("offshoot-admin-"), "pglite");
    const first = await openPglite(dir);
    const second = await openPglite(dir).catch((e: unknown) => e);
    expect(second).toBeInstanceOf(PgliteInUseError);
    expect(second).toMatchObject({ pid: process.pid });
    await first.close();
    const reopened = await openPglite(dir);
    await reopened.close();
  });
});
