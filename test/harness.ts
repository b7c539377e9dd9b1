// The integration harness for end-to-end tests: real processes, a real Postgres, real WebSockets.
//
//   const { database, url } = await testDatabase();        // a fresh migrated database
//   const { apiKey } = await seedTenant(database.db);
//   const { hostId, token } = await registerHost(database.db);
//   const cp = await spawnControlPlane({ databaseUrl: url });
//   const agent = await spawnAgent({ cpUrl: cp.url, token });
//   await hostOnline(database.db, hostId);
//   const client = hypeman(cp.url, apiKey);
//
// Everything it starts (processes, temp dirs, databases) is tracked: `cleanupAll()` releases it,
// and it runs by itself after each test file (afterAll, registered on import) and, for the
// processes, when the worker exits or is killed. Children run under `setpriv --pdeathsig
// SIGKILL` where available, so even a SIGKILLed test worker leaves no orphan behind.
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type { TenantEvent } from "@offshoot/shared";
import { Hypeman } from "@onkernel/hypeman";
import { eq } from "drizzle-orm";
import postgres from "postgres";
import { afterAll, expect, inject } from "vitest";
import type { Database, Db } from "../control-plane/src/db/client.ts";
import { openPglite, openPostgres } from "../control-plane/src/db/open.ts";
import { hosts, type instances } from "../control-plane/src/db/schema/index.ts";
import {
  createApiKey,
  createHost,
  ensureTenant,
} from "../control-plane/src/services/credentials.ts";
import { FILL_PROGRAM } from "../host-agent/testing/qemu.ts";
import { TEST_IMAGE } from "../scripts/oci-image.ts";
import { freePort } from "../scripts/postgres.ts";
import { TEMPLATE_DB, withDatabase } from "./global-setup.ts";

export { freePort };

export const REPO_ROOT = fileURLToPath(new URL("..", import.meta.url));
const CONTROL_PLANE_MAIN = path.join(REPO_ROOT, "control-plane/src/main.ts");
const AGENT_MAIN = path.join(REPO_ROOT, "host-agent/src/main.ts");

const uniq = () => randomBytes(5).toString("hex");

// ---------------------------------------------------------------------------------------------
// Cleanup bookkeeping

type Cleanup = () => Promise<void>;
const processes = new Set<ManagedProcess>();
const databases = new Set<Cleanup>();
const tempDirs = new Set<string>();
const others = new Set<Cleanup>();

/** Runs `fn` in the next cleanupAll(), after the processes have stopped (e.g. to delete the
 * network namespaces a test file made for its agents). */
export function onCleanup(fn: Cleanup): void {
  others.add(fn);
}

/** Stops every process, drops every database and removes every temp dir this harness made,
 * then runs what onCleanup() was given. */
export async function cleanupAll(): Promise<void> {
  const errors: unknown[] = [];
  await Promise.all(
    [...processes].map(async (p) => {
      try {
        await p.stop();
      } catch (e) {
        errors.push(e);
      }
      p.killGroup();
      processes.delete(p);
    }),
  );
  for (const drop of [...databases]) {
    try {
      await drop();
    } catch (e) {
      errors.push(e);
    }
  }
  for (const dir of [...tempDirs]) {
    rmSync(dir, { recursive: true, force: true });
    tempDirs.delete(dir);
  }
  for (const fn of [...others]) {
    others.delete(fn);
    try {
      await fn();
    } catch (e) {
      errors.push(e);
    }
  }
  if (errors.length)
    throw new AggregateError(errors, `cleanup failed: ${errors.map(String).join("; ")}`);
}

/** A fresh temp dir, removed by cleanupAll(). */
export function tempDir(prefix = "offshoot-test-"): string {
  installExitHooks();
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

// Last resort: a worker that exits, crashes or is terminated takes its children with it.
let exitHooksInstalled = false;
function installExitHooks(): void {
  if (exitHooksInstalled) return;
  exitHooksInstalled = true;
  const emergencyCleanup = () => {
    for (const p of processes) p.killGroup();
    for (const dir of tempDirs) {
      try {
        rmSync(dir, { recursive: true, force: true });
      } catch {
        // Best effort while exiting.
      }
    }
  };
  process.on("exit", emergencyCleanup);
  for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
    process.once(signal, () => {
      emergencyCleanup();
      // Re-raise: with this listener gone, the default action (or the runner's own) applies.
      if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
    });
  }
}

if (process.env.VITEST) {
  afterAll(cleanupAll);
}

// ---------------------------------------------------------------------------------------------
// Databases

function serverUrl(): string {
  const url =
    process.env.TEST_DATABASE_URL ?? (process.env.VITEST ? inject("testDatabaseUrl") : undefined);
  if (!url)
    throw new Error("TEST_DATABASE_URL is not set (test/global-setup.ts sets it under vitest)");
  return url;
}

export interface TestDatabase {
  /** postgres://…/t_<random>: pass it to spawnControlPlane. */
  url: string;
  /** An open, migrated connection pool to it. */
  database: Database;
  /** Closes the pool and drops the database (WITH (FORCE)). Safe to call twice. */
  drop(): Promise<void>;
}

/** A fresh database copied from the migrated template, on the test Postgres server. */
export async function testDatabase(): Promise<TestDatabase> {
  const server = serverUrl();
  const name = `t_${uniq()}`;
  const admin = postgres(server, { max: 1, onnotice: () => {} });
  try {
    await admin.unsafe(`CREATE DATABASE ${name} TEMPLATE ${TEMPLATE_DB}`);
  } finally {
    await admin.end({ timeout: 5 });
  }
  const url = withDatabase(server, name);
  const database = await openPostgres(url, { max: 5 });
  let dropped = false;
  const drop = async () => {
    if (dropped) return;
    dropped = true;
    databases.delete(drop);
    await database.close();
    const sql = postgres(server, { max: 1, onnotice: () => {} });
    try {
      await sql.unsafe(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
    } finally {
      await sql.end({ timeout: 5 });
    }
  };
  databases.add(drop);
  return { url, database, drop };
}

/** The two databases the control plane runs on, for `describe.each`: a fresh database on the
 * test Postgres server, and embedded PGlite in a temporary directory. */
export const databaseBackends: Array<
  [string, () => Promise<{ db: Db; close: () => Promise<void> }>]
> = [
  [
    "Postgres server",
    async () => {
      const t = await testDatabase();
      return { db: t.database.db, close: t.drop };
    },
  ],
  ["PGlite", () => openPglite(tempDir("offshoot-pglite-"))],
];

/** A tenant (unique name unless given) and a fresh API key for it. */
export async function seedTenant(
  db: Db,
  name = `tenant-${uniq()}`,
): Promise<{ tenantId: string; apiKey: string }> {
  const tenantId = await ensureTenant(db, name);
  const { key } = await createApiKey(db, tenantId);
  return { tenantId, apiKey: key };
}

/** An instance row to insert directly (tests of single services): the fields a row needs,
 * named by its id, Running, without network unless `extra` says otherwise. */
export function instanceValues(
  tenantId: string,
  hostId: string,
  id: string,
  extra: Partial<typeof instances.$inferInsert> = {},
): typeof instances.$inferInsert {
  return {
    id,
    tenantId,
    hostId,
    name: id,
    image: "alpine",
    hypervisor: "qemu",
    state: "Running",
    vcpus: 1,
    memoryBytes: 2 ** 28,
    overlayBytes: 2 ** 30,
    networkEnabled: false,
    ...extra,
  };
}

/** A registered host (unique name unless given) and the token its agent presents. */
export async function registerHost(
  db: Db,
  name = `host-${uniq()}`,
): Promise<{ hostId: string; token: string }> {
  const { id, token } = await createHost(db, name);
  return { hostId: id, token };
}

// ---------------------------------------------------------------------------------------------
// Processes

const hasSetpriv = (() => {
  if (process.platform !== "linux") return false;
  const r = spawnSync("setpriv", ["--help"], { encoding: "utf8" });
  return r.status === 0 && r.stdout.includes("--pdeathsig");
})();

const MAX_OUTPUT = 4 * 1024 * 1024;

/** One long-running child (`node --import tsx <script>`) that can be killed and started again. */
class ManagedProcess {
  private child: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();
  private buf = "";
  private lines: Array<(line: string) => void> = [];

  constructor(
    private readonly script: string,
    private readonly env: () => NodeJS.ProcessEnv,
    private readonly label: string,
  ) {}

  get pid(): number {
    return this.child?.pid ?? -1;
  }

  get running(): boolean {
    return !!this.child && this.child.exitCode === null && this.child.signalCode === null;
  }

  output(): string {
    return this.buf;
  }

  /** Spawns the process; `exit` settles when it exits. */
  start(): { exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }> } {
    if (this.running) throw new Error(`${this.label} is already running (pid ${this.pid})`);
    installExitHooks();
    processes.add(this);
    const nodeArgs = ["--import", "tsx", this.script];
    const [cmd, args] = hasSetpriv
      ? ["setpriv", ["--pdeathsig", "SIGKILL", "--", process.execPath, ...nodeArgs]]
      : [process.execPath, nodeArgs];
    const child = spawn(cmd, args, {
      cwd: REPO_ROOT,
      env: this.env(),
      stdio: ["ignore", "pipe", "pipe"],
      // Its own process group, so that cleanup can also reach anything it started.
      detached: true,
    });
    this.child = child;
    this.buf += `--- ${this.label}: started pid ${child.pid ?? "?"} at ${new Date().toISOString()}\n`;
    let partial = "";
    const onData = (chunk: Buffer) => {
      const text = chunk.toString("utf8");
      this.buf += text;
      if (this.buf.length > MAX_OUTPUT) this.buf = this.buf.slice(-MAX_OUTPUT / 2);
      partial += text;
      const parts = partial.split("\n");
      partial = parts.pop() ?? "";
      for (const line of parts) for (const fn of this.lines) fn(line);
    };
    child.stdout?.on("data", onData);
    child.stderr?.on("data", onData);
    const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
      child.once("error", (err) => {
        this.buf += `--- ${this.label}: spawn error: ${String(err)}\n`;
        resolve({ code: null, signal: null });
      });
      child.once("close", (code, signal) => {
        this.buf += `--- ${this.label}: exited (${signal ?? `code ${code}`})\n`;
        resolve({ code, signal });
      });
    });
    this.exited = exit.then(() => undefined);
    return { exit };
  }

  /** Calls `fn` with each complete output line (stdout and stderr) until it returns true. */
  onLine(fn: (line: string) => boolean): () => void {
    const wrapped = (line: string) => {
      if (fn(line)) remove();
    };
    const remove = () => {
      this.lines = this.lines.filter((f) => f !== wrapped);
    };
    this.lines.push(wrapped);
    return remove;
  }

  /** Sends `signal` to the process (not its group) and waits until it has exited. */
  async kill(signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    if (this.running) this.child?.kill(signal);
    await this.exited;
  }

  /** SIGTERM, then SIGKILL if it has not exited after `graceMs`. */
  async stop(graceMs = 5000): Promise<void> {
    if (!this.running) {
      await this.exited;
      return;
    }
    this.child?.kill("SIGTERM");
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      this.exited.then(() => false),
      new Promise<boolean>((r) => {
        timer = setTimeout(() => r(true), graceMs);
      }),
    ]);
    clearTimeout(timer);
    if (timedOut) {
      this.buf += `--- ${this.label}: did not exit ${graceMs} ms after SIGTERM; SIGKILL\n`;
      this.child?.kill("SIGKILL");
      await this.exited;
    }
  }

  /** SIGKILL to the whole process group (synchronous; for cleanup). */
  killGroup(): void {
    const pid = this.child?.pid;
    if (!pid) return;
    try {
      process.kill(-pid, "SIGKILL");
    } catch {
      // Already gone.
    }
  }
}

function childEnv(
  defaults: Record<string, string>,
  overrides: Record<string, string> | undefined,
): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...defaults, ...overrides };
  // The worker's own test-runner settings are not the child's business.
  for (const key of ["VITEST", "VITEST_MODE", "VITEST_POOL_ID", "VITEST_WORKER_ID", "TEST"]) {
    if (!(overrides && key in overrides)) delete env[key];
  }
  return env;
}

export interface CpProcess {
  /** http://127.0.0.1:PORT (the same across restarts). */
  url: string;
  port: number;
  /** The current process's pid. */
  readonly pid: number;
  /** Everything it printed so far (stdout and stderr, all runs). */
  output(): string;
  /** Sends a signal (default SIGTERM) and waits for the process to exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Starts it again on the same port (stopping it first if it still runs); waits for "listening". */
  restart(): Promise<void>;
  /** SIGTERM, wait, SIGKILL after 5 s. */
  stop(): Promise<void>;
}

const CP_START_TIMEOUT_MS = 30_000;

/** Starts the control plane and waits for its `"msg":"listening"` log line. */
export async function spawnControlPlane(opts: {
  databaseUrl: string;
  port?: number;
  env?: Record<string, string>;
}): Promise<CpProcess> {
  const port = opts.port ?? (await freePort());
  const env = () =>
    childEnv(
      {
        PORT: String(port),
        HOST: "127.0.0.1",
        DATABASE_URL: opts.databaseUrl,
        HEARTBEAT_MS: "200",
        // Long enough that a loaded machine's late heartbeat never looks like a silent host;
        // a test of silence sets its own.
        HOST_GRACE_MS: "10000",
        COMMAND_TIMEOUT_MS: "30000",
      },
      opts.env,
    );
  const proc = new ManagedProcess(CONTROL_PLANE_MAIN, env, "control-plane");

  const start = async () => {
    let removeListener = () => {};
    let timer: NodeJS.Timeout | undefined;
    try {
      await new Promise<void>((resolve, reject) => {
        removeListener = proc.onLine((line) => {
          if (!line.includes('"listening"')) return false;
          try {
            const rec = JSON.parse(line) as { msg?: unknown };
            if (rec.msg !== "listening") return false;
          } catch {
            return false;
          }
          resolve();
          return true;
        });
        const { exit } = proc.start();
        void exit.then(({ code, signal }) =>
          reject(
            new Error(
              `control plane exited (${signal ?? `code ${code}`}) before listening on port ${port}:\n${proc.output()}`,
            ),
          ),
        );
        timer = setTimeout(() => {
          reject(
            new Error(
              `control plane did not log "listening" within ${CP_START_TIMEOUT_MS} ms:\n${proc.output()}`,
            ),
          );
        }, CP_START_TIMEOUT_MS);
      });
    } catch (e) {
      await proc.stop(1000);
      throw e;
    } finally {
      clearTimeout(timer);
      removeListener();
    }
  };

  await start();
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    get pid() {
      return proc.pid;
    },
    output: () => proc.output(),
    kill: (signal) => proc.kill(signal),
    restart: async () => {
      await proc.stop();
      await start();
    },
    stop: () => proc.stop(),
  };
}

export interface ExecLogEntry {
  command_id: string;
  kind: string;
  instance_id?: string;
}

export interface AgentProcess {
  /** AGENT_DATA_DIR: kept across restarts, removed by cleanupAll() if the harness made it. */
  dataDir: string;
  readonly pid: number;
  output(): string;
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Starts it again with the same data dir (stopping it first if it still runs). */
  restart(): Promise<void>;
  stop(): Promise<void>;
  /** The sim driver's <dataDir>/sim-exec.log, one entry per executed operation. */
  execLog(): ExecLogEntry[];
}

/** Starts a host agent (sim driver). Resolves once spawned: wait for `hostOnline` yourself. */
export async function spawnAgent(opts: {
  cpUrl: string;
  token: string;
  dataDir?: string;
  env?: Record<string, string>;
}): Promise<AgentProcess> {
  const dataDir = opts.dataDir ?? tempDir("offshoot-agent-");
  const env = () =>
    childEnv(
      {
        CONTROL_PLANE_URL: opts.cpUrl,
        HOST_TOKEN: opts.token,
        AGENT_DATA_DIR: dataDir,
        AGENT_DRIVER: "sim",
        AGENT_VCPUS: "64",
        AGENT_MEMORY: "256GB",
      },
      opts.env,
    );
  const proc = new ManagedProcess(AGENT_MAIN, env, "host-agent");
  const start = async () => {
    const { exit } = proc.start();
    // A spawn failure (not a later crash) rejects right away.
    const early = await Promise.race([
      exit,
      new Promise<undefined>((r) => setTimeout(() => r(undefined), 20)),
    ]);
    if (early && early.code === null && early.signal === null) {
      throw new Error(`could not spawn the agent:\n${proc.output()}`);
    }
  };
  await start();
  return {
    dataDir,
    get pid() {
      return proc.pid;
    },
    output: () => proc.output(),
    kill: (signal) => proc.kill(signal),
    restart: async () => {
      await proc.stop();
      await start();
    },
    stop: () => proc.stop(),
    execLog: () => readExecLog(path.join(dataDir, "sim-exec.log")),
  };
}

function readExecLog(file: string): ExecLogEntry[] {
  if (!existsSync(file)) return [];
  const entries: ExecLogEntry[] = [];
  for (const line of readFileSync(file, "utf8").split("\n")) {
    if (!line.trim()) continue;
    try {
      const rec = JSON.parse(line) as Partial<ExecLogEntry>;
      if (typeof rec.command_id === "string" && typeof rec.kind === "string") {
        entries.push({
          command_id: rec.command_id,
          kind: rec.kind,
          ...(typeof rec.instance_id === "string" ? { instance_id: rec.instance_id } : {}),
        });
      }
    } catch {
      // A line still being written.
    }
  }
  return entries;
}

// ---------------------------------------------------------------------------------------------
// Waiting and clients

/** Polls `fn` until it returns something truthy; throws naming `what` on timeout. */
export async function waitFor<T>(
  fn: () => Promise<T | undefined | null | false> | T | undefined | null | false,
  opts: { timeoutMs?: number; intervalMs?: number; what?: string } = {},
): Promise<T> {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const intervalMs = opts.intervalMs ?? 50;
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const value = await fn();
      if (value !== undefined && value !== null && value !== false) return value;
      lastError = undefined;
    } catch (e) {
      lastError = e;
    }
    if (Date.now() >= deadline) {
      const why = lastError === undefined ? "" : ` (last error: ${String(lastError)})`;
      throw new Error(
        `timed out after ${timeoutMs} ms waiting for ${opts.what ?? "a condition"}${why}`,
      );
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Waits until the host's row says `online`. */
export async function hostOnline(db: Db, hostId: string, timeoutMs = 15_000): Promise<void> {
  await waitFor(
    async () => {
      const [row] = await db
        .select({ status: hosts.status })
        .from(hosts)
        .where(eq(hosts.id, hostId));
      return row?.status === "online";
    },
    { timeoutMs, intervalMs: 100, what: `host ${hostId} to be online` },
  );
}

/** The official Hypeman client against the control plane, without retries, and with the
 * server's own deadlines (not the client's 60 s) deciding how long a request may take. */
export function hypeman(cpUrl: string, apiKey: string): Hypeman {
  return new Hypeman({ baseURL: cpUrl, apiKey, maxRetries: 0, timeout: 5 * 60_000 });
}

/** A guest's console log (`app`), its last 10,000 lines, through the API. */
export async function consoleLines(client: Hypeman, name: string): Promise<string[]> {
  const lines: string[] = [];
  for await (const line of await client.instances.logs(name, { tail: 10_000 })) lines.push(line);
  return lines;
}

/** The counts a test-image guest printed (`OFFSHOOT-COUNT n`), oldest first. */
export async function consoleCounts(client: Hypeman, name: string): Promise<number[]> {
  return (await consoleLines(client, name)).flatMap((l) => {
    const m = /OFFSHOOT-COUNT (\d+)/.exec(l);
    return m ? [Number(m[1])] : [];
  });
}

/** Creates a 256 MiB guest of the test image running FILL_PROGRAM and waits until it has filled
 * 40 % of its RAM. */
export async function createFilledGuest(
  client: Hypeman,
  name: string,
  timeoutMs: number,
): Promise<void> {
  await client.instances.create({
    name,
    image: TEST_IMAGE,
    size: "256MB",
    vcpus: 1,
    cmd: ["sh", "-c", FILL_PROGRAM],
  });
  await waitFor(
    async () => (await consoleLines(client, name)).some((l) => l.includes("OFFSHOOT-FILLED")),
    { timeoutMs, intervalMs: 250, what: `${name} to fill its memory` },
  );
}

export interface ApiResponse {
  status: number;
  /** Parsed JSON; the text if it is not JSON; undefined if empty. */
  body: unknown;
  headers: Headers;
}

/** The data of an SSE response's events, each parsed as the JSON it is. */
export function sseData(text: string): unknown[] {
  return text
    .split("\n")
    .filter((l) => l.startsWith("data: "))
    .map((l) => JSON.parse(l.slice(6)) as unknown);
}

/** Raw HTTP for exact assertions; no key → no Authorization header. */
export function api(
  cpUrl: string,
  apiKey?: string,
): (method: string, path: string, body?: unknown) => Promise<ApiResponse> {
  return async (method, urlPath, body) => {
    const headers: Record<string, string> = {};
    if (apiKey) headers.authorization = `Bearer ${apiKey}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const res = await fetch(new URL(urlPath, cpUrl), {
      method,
      headers,
      body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
    });
    const text = await res.text();
    let parsed: unknown = text || undefined;
    if (text) {
      try {
        parsed = JSON.parse(text);
      } catch {
        // Not JSON: keep the text.
      }
    }
    return { status: res.status, body: parsed, headers: res.headers };
  };
}

// ---------------------------------------------------------------------------------------------
// Event streams

interface Frame {
  id: string | undefined;
  event: string | undefined;
  data: string;
}

/** An open GET /events stream, read event by event (keepalive comments skipped). */
export async function openEvents(url: string, key: string, headers: Record<string, string> = {}) {
  const abort = new AbortController();
  const res = await fetch(`${url}/events`, {
    headers: { authorization: `Bearer ${key}`, ...headers },
    signal: abort.signal,
  });
  const reader = res.body?.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  const next = async (): Promise<TenantEvent> => {
    for (;;) {
      const end = buffered.indexOf("\n\n");
      if (end >= 0) {
        const block = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        const frame: Frame = { id: undefined, event: undefined, data: "" };
        for (const line of block.split("\n")) {
          if (line.startsWith("id:")) frame.id = line.slice(3).trim();
          else if (line.startsWith("event:")) frame.event = line.slice(6).trim();
          else if (line.startsWith("data:")) frame.data += line.slice(5).trim();
        }
        if (frame.data === "") continue; // a keepalive comment
        const e = JSON.parse(frame.data) as TenantEvent;
        expect(frame.event).toBe(e.type);
        expect(frame.id).toBe(String(e.id));
        return e;
      }
      const chunk = await reader?.read();
      if (!chunk || chunk.done) throw new Error("the event stream ended");
      buffered += decoder.decode(chunk.value, { stream: true });
    }
  };
  /** Events until one satisfies `last` (included). */
  const until = async (last: (e: TenantEvent) => boolean) => {
    const seen: TenantEvent[] = [];
    for (;;) {
      const e = await next();
      seen.push(e);
      if (last(e)) return seen;
    }
  };
  return { status: res.status, res, next, until, close: () => abort.abort() };
}
