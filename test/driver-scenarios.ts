// Connections that close under a postgres.js client, each scenario in a process of its own:
// on an unpatched driver some of them end the process with an uncaught exception, which must
// not take a test worker down with it (control-plane/src/db/driver.test.ts runs them).
//
//   DATABASE_URL=… node --import tsx test/driver-scenarios.ts <scenario>
//
// Prints one JSON line, {"scenario": …, …what each query got}, and exits 0 when the scenario
// ran to its end; an outcome is "ok" or the error's code (or message when it has none).
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { sql as drizzleSql } from "drizzle-orm";
import postgres from "postgres";
import { connectPostgres, statement, transaction } from "../control-plane/src/db/client.ts";

/** The driver's code for an error, looking through drizzle's wrapping (`cause`). */
export function driverCode(e: unknown): string {
  let cur: unknown = e;
  for (let i = 0; i < 4 && cur && typeof cur === "object"; i++) {
    const rec = cur as { code?: unknown; cause?: unknown };
    if (typeof rec.code === "string") return rec.code;
    cur = rec.cause;
  }
  return e instanceof Error ? e.message : String(e);
}

export const outcome = (p: Promise<unknown>): Promise<string> =>
  p.then(
    () => "ok",
    (e: unknown) => driverCode(e),
  );

/** Polls the server until `pid` is inside pg_sleep (a condition, not a fixed wait). */
async function untilActive(admin: postgres.Sql, pid: number): Promise<void> {
  for (;;) {
    const rows = await admin`select 1 from pg_stat_activity
      where pid = ${pid} and state = 'active' and query like '%pg_sleep%'`;
    if (rows.length) return;
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Resolves the next time the pool reports a connection closed. */
function closes(): { onclose: () => void; next: () => Promise<void> } {
  let waiting: (() => void)[] = [];
  return {
    onclose: () => {
      const w = waiting;
      waiting = [];
      for (const r of w) r();
    },
    next: () => new Promise<void>((r) => waiting.push(r)),
  };
}

/**
 * postgres.js's `socket` option (in its README, not in its types): a function returning the
 * connected socket for each new connection. Each one is pushed to `sockets`.
 */
export function withSockets(
  url: string,
  sockets: net.Socket[],
): postgres.Options<Record<string, never>> {
  const u = new URL(url);
  const socket = () =>
    new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect(Number(u.port), u.hostname);
      sockets.push(s);
      s.once("connect", () => resolve(s));
      s.once("error", reject);
    });
  const options: postgres.Options<Record<string, never>> & { socket: typeof socket } = { socket };
  return options;
}

type Scenario = (url: string) => Promise<Record<string, unknown>>;

const scenarios: Record<string, Scenario> = {
  // A reserved connection whose backend is terminated while idle; once the driver has seen the
  // close, the handle is used twice (a statement, then the rollback that follows a failure).
  async "reserved-terminated"(url) {
    const closed = closes();
    const sql = postgres(url, { max: 1, onnotice: () => {}, onclose: closed.onclose });
    const admin = postgres(url, { max: 1, onnotice: () => {} });
    try {
      const r = await sql.reserve();
      const [row] = await r`select pg_backend_pid() as pid`;
      const seen = closed.next();
      await admin`select pg_terminate_backend(${Number(row?.pid)})`;
      await seen;
      const first = await outcome(r`select 1`);
      const second = await outcome(r`rollback`);
      r.release();
      const pool = await outcome(sql`select 1`);
      return { first, second, pool };
    } finally {
      await Promise.all([sql.end({ timeout: 1 }), admin.end({ timeout: 1 })]);
    }
  },

  // A reserved connection with a statement queued behind one in flight (a statement with
  // parameters is described first, and the handle holds what follows until then) when its
  // backend is terminated; then the pool reconnects that connection for a query of its own,
  // and the old handle is used once more.
  async "reserved-queued"(url) {
    const closed = closes();
    const sql = postgres(url, { max: 1, onnotice: () => {}, onclose: closed.onclose });
    const admin = postgres(url, { max: 1, onnotice: () => {} });
    try {
      const r = await sql.reserve();
      const [row] = await r`select pg_backend_pid() as pid`;
      const pid = Number(row?.pid);
      const sleeping = outcome(r`select pg_sleep(${60})`);
      const queued = outcome(r`select 1`);
      await untilActive(admin, pid);
      const seen = closed.next();
      await admin`select pg_terminate_backend(${pid})`;
      await seen;
      const [sleep, queuedOutcome] = await Promise.all([sleeping, queued]);
      const pool = await outcome(sql`select 1`);
      // Unpatched, this runs on the session the pool just opened: outside any transaction of
      // the handle's owner.
      const after = await outcome(r`select 1`);
      r.release();
      const poolAgain = await outcome(sql`select 1`);
      return { sleep, queued: queuedOutcome, pool, after, poolAgain };
    } finally {
      await Promise.all([sql.end({ timeout: 1 }), admin.end({ timeout: 1 })]);
    }
  },

  // A reserve() waiting for the pool's only connection when that connection's backend is
  // terminated: the pool reconnects it for the reserve(), which must then get it.
  async "reserve-waiting"(url) {
    const closed = closes();
    const sql = postgres(url, { max: 1, onnotice: () => {}, onclose: closed.onclose });
    const admin = postgres(url, { max: 1, onnotice: () => {} });
    try {
      const [row] = await sql`select pg_backend_pid() as pid`;
      const pid = Number(row?.pid);
      const busy = outcome(sql`select pg_sleep(60)`);
      await untilActive(admin, pid);
      let reserved: postgres.ReservedSql | undefined;
      const waiting = sql.reserve().then((r) => {
        reserved = r;
      });
      const seen = closed.next();
      await admin`select pg_terminate_backend(${pid})`;
      await seen;
      const sleep = await busy;
      // Unpatched, the reserve() is never answered: awaited until the child is killed.
      await waiting;
      const inside = await outcome(
        reserved ? reserved`select 1` : Promise.reject(new Error("none")),
      );
      reserved?.release();
      const pool = await outcome(sql`select 1`);
      return { sleep, inside, pool };
    } finally {
      await Promise.all([sql.end({ timeout: 1 }), admin.end({ timeout: 1 })]);
    }
  },

  // A reserve() that fails to connect (the server refuses) while a second request waits: the
  // failed one must leave the pool's waiting list, so the connection later goes to the next.
  async "reserve-refused"(url) {
    const u = new URL(url);
    let refuse = 1;
    // The first connection attempt goes to a port nothing listens on. The socket is handed
    // over unconnected, so the refusal arrives as its 'error' and 'close', as it does for the
    // driver's own sockets.
    const socket = () => net.connect(refuse-- > 0 ? 1 : Number(u.port), u.hostname);
    const options = { socket, max: 1, onnotice: () => {} } as postgres.Options<
      Record<string, never>
    >;
    const sql = postgres(url, options);
    try {
      const first = await outcome(sql.reserve());
      const r = await sql.reserve();
      const inside = await outcome(r`select 1`);
      r.release();
      const pool = await outcome(sql`select 1`);
      return { first, inside, pool };
    } finally {
      await sql.end({ timeout: 1 });
    }
  },

  // The control plane's own transaction (a reserved connection, rollback on failure, release)
  // whose backend is terminated mid-statement; the pool has that one connection only.
  async "transaction-terminated"(url) {
    const database = connectPostgres(url, { max: 1 });
    const admin = postgres(url, { max: 1, onnotice: () => {} });
    try {
      let pid = 0;
      const tx = outcome(
        transaction(
          database.db,
          async (t) => {
            const [row] = await statement(t, drizzleSql`select pg_backend_pid() as pid`);
            pid = Number(row?.pid);
            await statement(t, drizzleSql`select pg_sleep(60)`);
          },
          1,
        ),
      );
      while (!pid) await new Promise((r) => setTimeout(r, 10));
      await untilActive(admin, pid);
      await admin`select pg_terminate_backend(${pid})`;
      const transactionOutcome = await tx;
      const after = await outcome(statement(database.db, drizzleSql`select 1`));
      return { transaction: transactionOutcome, after };
    } finally {
      await Promise.all([database.close(), admin.end({ timeout: 1 })]);
    }
  },

  // A socket that errors while a reserved connection's statement is in flight; the rollback
  // issued on that failure reaches the connection between the socket's 'error' and 'close'.
  async "error-before-close"(url) {
    const sockets: net.Socket[] = [];
    const sql = postgres(url, { ...withSockets(url, sockets), max: 1, onnotice: () => {} });
    const admin = postgres(url, { max: 1, onnotice: () => {} });
    try {
      const r = await sql.reserve();
      const [row] = await r`select pg_backend_pid() as pid`;
      let rollback: Promise<string> = Promise.resolve("not issued");
      const first = outcome(
        r`select pg_sleep(60)`.catch((e: unknown) => {
          rollback = outcome(r`rollback`);
          throw e;
        }),
      );
      await untilActive(admin, Number(row?.pid));
      sockets[0]?.destroy(Object.assign(new Error("socket reset"), { code: "TEST_RESET" }));
      const statementOutcome = await first;
      const rollbackOutcome = await rollback;
      r.release();
      const pool = await outcome(sql`select 1`);
      return { statement: statementOutcome, rollback: rollbackOutcome, pool };
    } finally {
      await Promise.all([sql.end({ timeout: 1 }), admin.end({ timeout: 1 })]);
    }
  },
};

export const SCENARIOS = Object.keys(scenarios);

async function main(): Promise<void> {
  const name = process.argv[2] ?? "";
  const url = process.env.DATABASE_URL;
  const scenario = scenarios[name];
  if (!scenario || !url) {
    process.stderr.write(
      `usage: DATABASE_URL=… node --import tsx test/driver-scenarios.ts <${SCENARIOS.join("|")}>\n`,
    );
    process.exit(2);
  }
  const result = await scenario(url);
  process.stdout.write(`${JSON.stringify({ scenario: name, ...result })}\n`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await main();
}
