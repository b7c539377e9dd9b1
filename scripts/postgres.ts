// A throwaway PostgreSQL server for tests and local runs: a fresh cluster in a temp dir, on a
// free port on 127.0.0.1, trust auth, durability off (it is deleted on stop anyway).
//
//   import { ensurePostgres } from "./scripts/postgres.ts";
//   const pg = await ensurePostgres();   // pg.url = postgres://postgres@127.0.0.1:PORT/postgres
//   await pg.stop();                     // stops the server and removes its directory
//
// As a CLI, `tsx scripts/postgres.ts` starts one, prints DATABASE_URL=… and keeps it running
// until SIGTERM/SIGINT.
//
// If the server binaries are missing it installs Debian's `postgresql` with apt-get (as root).
// Postgres refuses to run as root, so as root the cluster belongs to the `postgres` user.
import { execFileSync, spawnSync } from "node:child_process";
import { chownSync, existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import postgres from "postgres";

export interface PostgresServer {
  /** postgres://postgres@127.0.0.1:PORT/postgres */
  url: string;
  port: number;
  /** The cluster's directory: data/ holds the cluster, the Unix socket and log sit beside it. */
  dir: string;
  /** Stops the server (pg_ctl stop -m fast) and removes its directory. Safe to call twice. */
  stop(): Promise<void>;
  /** Outages, for tests: `pg_ctl restart`, or a stop and a later start on the same port, with
   * every session ended as `mode` says (fast: terminated cleanly; immediate: as in a crash). */
  restart(mode: "fast" | "immediate"): void;
  halt(mode: "fast" | "immediate"): void;
  resume(): Promise<void>;
}

const PG_LIB = "/usr/lib/postgresql";
const PREFERRED_VERSION = "15";

const log = (msg: string) => process.stderr.write(`[postgres] ${msg}\n`);

/** The bin dir of an installed server (15 if present, else the newest), or undefined. */
export function findPostgresBin(): string | undefined {
  const preferred = path.join(PG_LIB, PREFERRED_VERSION, "bin");
  if (existsSync(path.join(preferred, "postgres"))) return preferred;
  if (!existsSync(PG_LIB)) return undefined;
  const versions = readdirSync(PG_LIB)
    .filter((v) => existsSync(path.join(PG_LIB, v, "bin", "postgres")))
    .sort((a, b) => Number(b) - Number(a));
  return versions[0] ? path.join(PG_LIB, versions[0], "bin") : undefined;
}

function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv } = {}): void {
  const r = spawnSync(cmd, args, {
    stdio: ["ignore", "inherit", "inherit"],
    env: opts.env ?? process.env,
  });
  if (r.error) throw r.error;
  if (r.status !== 0)
    throw new Error(`${cmd} ${args.join(" ")} exited with ${r.status ?? r.signal}`);
}

/** Installs the server binaries with apt-get when they are missing; returns the bin dir. */
export function installPostgres(): string {
  const found = findPostgresBin();
  if (found) return found;
  if (process.getuid?.() !== 0) {
    throw new Error(
      "PostgreSQL server binaries are missing; install them: apt-get install -y postgresql",
    );
  }
  const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
  log(
    "server binaries missing: apt-get update && apt-get install -y --no-install-recommends postgresql",
  );
  run("apt-get", ["update"], { env });
  run("apt-get", ["install", "-y", "--no-install-recommends", "postgresql"], { env });
  const bin = findPostgresBin();
  if (!bin)
    throw new Error(`apt-get installed postgresql but no server binary is under ${PG_LIB}/*/bin`);
  log(`installed: ${bin}`);
  return bin;
}

/** A TCP port that was free on 127.0.0.1 a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => (port ? resolve(port) : reject(new Error("could not get a free port"))));
    });
  });
}

interface Owner {
  /** Runs a server binary as the cluster's owner. */
  argv(bin: string, args: string[]): [string, string[]];
  chown(dir: string): void;
}

function owner(): Owner {
  if (process.getuid?.() !== 0) {
    return { argv: (bin, args) => [bin, args], chown: () => {} };
  }
  const uid = Number(execFileSync("id", ["-u", "postgres"], { encoding: "utf8" }).trim());
  const gid = Number(execFileSync("id", ["-g", "postgres"], { encoding: "utf8" }).trim());
  return {
    argv: (bin, args) => ["runuser", ["-u", "postgres", "--", bin, ...args]],
    chown: (dir) => chownSync(dir, uid, gid),
  };
}

function exec(argv: [string, string[]], what: string): string {
  const [cmd, args] = argv;
  const r = spawnSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  if (r.error) throw r.error;
  if (r.status !== 0) {
    throw new Error(
      `${what} failed (${r.status ?? r.signal}): ${`${r.stdout}\n${r.stderr}`.trim()}`,
    );
  }
  return r.stdout;
}

/** A temp dir the cluster's owner can use (a TMPDIR under /root would not be reachable). */
function makeDir(who: Owner): string {
  const bases = [...new Set([os.tmpdir(), "/tmp"])];
  for (const base of bases) {
    const dir = mkdtempSync(path.join(base, "offshoot-pg-"));
    who.chown(dir);
    try {
      exec(who.argv("test", ["-w", dir, "-a", "-x", dir]), "access check");
      return dir;
    } catch {
      rmSync(dir, { recursive: true, force: true });
    }
  }
  throw new Error(`no temp dir usable by the postgres user under ${bases.join(", ")}`);
}

async function waitForConnections(url: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    const sql = postgres(url, { max: 1, connect_timeout: 2, onnotice: () => {} });
    try {
      await sql`select 1`;
      return;
    } catch (e) {
      last = e;
    } finally {
      await sql.end({ timeout: 1 });
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(
    `postgres at ${url} did not accept connections in ${timeoutMs} ms: ${String(last)}`,
  );
}

/** Servers started by this process that are still running; stopped on exit as a last resort. */
const running = new Set<() => void>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on("exit", () => {
    for (const stopNow of running) stopNow();
  });
}

/**
 * Starts a fresh PostgreSQL cluster on a free port on 127.0.0.1 and waits until it accepts
 * connections. Each call starts its own server; installing the binaries happens once.
 */
/**
 * `durable`: Postgres's own defaults (every COMMIT flushed to disk), as a production server
 * runs. Without it (tests) the server skips its flushes: fsync, synchronous_commit and full
 * page writes are off.
 */
export async function ensurePostgres(opts: { durable?: boolean } = {}): Promise<PostgresServer> {
  const bin = installPostgres();
  const who = owner();
  const dir = makeDir(who);
  const dataDir = path.join(dir, "data");
  const logFile = path.join(dir, "postgres.log");
  const pgCtl = path.join(bin, "pg_ctl");
  const t0 = Date.now();
  try {
    exec(
      who.argv(path.join(bin, "initdb"), [
        "-D",
        dataDir,
        "--auth=trust",
        "--username=postgres",
        "--encoding=UTF8",
        "--no-locale",
        "--no-sync",
      ]),
      "initdb",
    );
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }

  // Another process may grab the port between freePort() and the bind: retry a few times.
  let port = 0;
  let lastError: unknown;
  let serverOptions = "";
  for (let attempt = 0; attempt < 5 && !port; attempt++) {
    const candidate = await freePort();
    const options = [
      `-p ${candidate}`,
      "-c listen_addresses=127.0.0.1",
      `-k ${dir}`,
      "-c max_connections=400",
      ...(opts.durable
        ? []
        : ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]),
    ].join(" ");
    try {
      exec(
        who.argv(pgCtl, ["-D", dataDir, "-o", options, "-l", logFile, "-w", "-t", "60", "start"]),
        "pg_ctl start",
      );
      port = candidate;
      serverOptions = options;
    } catch (e) {
      lastError = e;
    }
  }
  const stopNow = (mode: "fast" | "immediate") => {
    spawnSync(...who.argv(pgCtl, ["-D", dataDir, "stop", "-m", mode, "-w", "-t", "30"]), {
      stdio: "ignore",
    });
    rmSync(dir, { recursive: true, force: true });
  };
  if (!port) {
    stopNow("immediate");
    throw new Error(`could not start postgres: ${String(lastError)}`);
  }

  const url = `postgres://postgres@127.0.0.1:${port}/postgres`;
  const emergencyStop = () => stopNow("immediate");
  running.add(emergencyStop);
  installExitHook();
  try {
    await waitForConnections(url, 30_000);
  } catch (e) {
    running.delete(emergencyStop);
    stopNow("immediate");
    throw e;
  }
  log(`started ${url} in ${Date.now() - t0} ms (dir ${dir})`);

  let stopped = false;
  const ctl = (args: string[], what: string) =>
    exec(who.argv(pgCtl, ["-D", dataDir, ...args]), what);
  return {
    url,
    port,
    dir,
    stop: async () => {
      if (stopped) return;
      stopped = true;
      running.delete(emergencyStop);
      stopNow("fast");
    },
    restart: (mode) =>
      ctl(["-o", serverOptions, "-l", logFile, "-m", mode, "-w", "-t", "60", "restart"], "restart"),
    halt: (mode) => ctl(["-m", mode, "-w", "-t", "60", "stop"], "pg_ctl stop"),
    resume: async () => {
      ctl(["-o", serverOptions, "-l", logFile, "-w", "-t", "60", "start"], "pg_ctl start");
      await waitForConnections(url, 30_000);
    },
  };
}

async function cli(): Promise<void> {
  const pg = await ensurePostgres();
  process.stdout.write(`DATABASE_URL=${pg.url}\n`);
  const stop = (signal: NodeJS.Signals) => {
    log(`${signal}: stopping`);
    pg.stop().then(
      () => process.exit(0),
      (e: unknown) => {
        log(`stop failed: ${String(e)}`);
        process.exit(1);
      },
    );
  };
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
  // Keep the event loop alive until a signal arrives.
  setInterval(() => {}, 1 << 30);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  cli().catch((e: unknown) => {
    log(String(e instanceof Error ? e.message : e));
    process.exit(1);
  });
}
