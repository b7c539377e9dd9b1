import { type Column, getTableColumns, getTableName, type SQL, sql } from "drizzle-orm";
import type { PgDatabase, PgQueryResultHKT, PgTable } from "drizzle-orm/pg-core";
import { drizzle as drizzlePostgres } from "drizzle-orm/postgres-js";
import postgres from "postgres";
import type * as schema from "./schema/index.ts";

export type Schema = typeof schema;
export type Db = PgDatabase<PgQueryResultHKT, Schema>;
export type Tx = Parameters<Parameters<Db["transaction"]>[0]>[0];
/** Anything a query can run on: the pool or an open transaction. */
export type Executor = Db | Tx;

export interface Database {
  db: Db;
  kind: "postgres" | "pglite";
  /** LISTEN/NOTIFY, for replicas sharing a Postgres server (none for embedded PGlite, which
   * one process owns). */
  pubsub?: PubSub;
  close(): Promise<void>;
}

export interface PubSub {
  /** Resolves once listening; returns the unlisten function. `onListen` is called each time
   * listening (re)starts: after a lost connection, NOTIFYs sent meanwhile are gone. */
  listen(
    channel: string,
    fn: (payload: string) => void,
    onListen?: () => void,
  ): Promise<() => Promise<void>>;
  notify(channel: string, payload: string): Promise<void>;
}

/**
 * How the driver meets an outage. A query that finds the server gone fails at once
 * (ECONNREFUSED) instead of queueing; a connection that closed with an error waits
 * `backoff(n)` seconds before its next attempt — the driver's default grows to 20 s, so a
 * control plane would stay down up to 20 s after Postgres is back; here at most 1 s. A server
 * that accepts TCP but does not answer is given CONNECT_TIMEOUT_S.
 */
export const CONNECT_TIMEOUT_S = 5;
const RECONNECT_BACKOFF_S = (attempt: number) => Math.min(0.05 * 2 ** attempt, 1);

/** A Postgres server (or Hyperdrive) connection: no migrations, nothing read from disk, so
 * this module also runs inside workerd. */
export function connectPostgres(url: string, opts: { max?: number } = {}): Database {
  const client = postgres(url, {
    max: opts.max ?? 10,
    onnotice: () => {},
    connect_timeout: CONNECT_TIMEOUT_S,
    backoff: RECONNECT_BACKOFF_S,
  });
  const db = drizzlePostgres(preparing(client)) as unknown as Db;
  const pubsub: PubSub = {
    // postgres.js keeps one dedicated connection for LISTEN and re-listens after a reconnect.
    listen: async (channel, fn, onListen) => {
      const { unlisten } = await client.listen(channel, fn, onListen);
      return unlisten;
    },
    notify: async (channel, payload) => {
      await client.notify(channel, payload);
    },
  };
  return { db, kind: "postgres", pubsub, close: () => client.end({ timeout: 5 }) };
}

/**
 * Drizzle sends each query as an unnamed statement, which Postgres parses and plans every
 * time; with a named (cached) statement per query text the same query costs about half. This
 * wraps the client — and each transaction's client — so every query is prepared.
 *
 * Transactions run on a reserved connection and never wait for BEGIN or COMMIT on their own:
 * BEGIN goes out with the first statement, and COMMIT right after the last statement issued
 * (see pipelinedTransaction).
 */
function preparing<T extends postgres.Sql | postgres.ReservedSql>(
  client: T,
  onError?: (e: unknown) => void,
): T {
  return new Proxy(client, {
    get(target, prop, receiver) {
      if (prop === "unsafe") {
        return (query: string, params: never[], options?: object) => {
          const q = target.unsafe(query, params, { ...options, prepare: true });
          // A statement the transaction's code issued but does not await still fails the
          // transaction (see pipelinedTransaction).
          if (onError) q.catch(onError);
          return q;
        };
      }
      if (prop === "begin" && "reserve" in target) {
        return (...args: unknown[]) => {
          const fn = args.at(-1) as (tx: postgres.ReservedSql) => unknown;
          const options = args.length > 1 ? String(args[0]).replace(/[^a-z ]/gi, "") : "";
          return pipelinedTransaction(target, options, fn);
        };
      }
      const value: unknown = Reflect.get(target, prop, receiver);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}

/**
 * A transaction on a reserved connection. COMMIT is sent as soon as `fn` resolves, behind any
 * statement `fn` issued without awaiting it: a transaction can end with statements whose
 * results it does not need in the same round trip as its COMMIT. Should any statement fail,
 * Postgres answers that COMMIT with ROLLBACK, and the transaction rejects with the first
 * failure.
 *
 * A reserved connection whose socket has closed is the driver's again (it reconnects it for
 * other queries), so once any statement reports the connection lost, nothing more is sent on
 * it — no ROLLBACK: the server ended the transaction with the session — and it is not
 * released: releasing would hand the pool a connection it already holds (porsager/postgres
 * #1208: writing to such a connection killed the process; see scripts/patch-postgres.ts).
 */
async function pipelinedTransaction<T>(
  sql: postgres.Sql,
  options: string,
  fn: (tx: postgres.ReservedSql) => T | Promise<T>,
): Promise<T> {
  const c = await sql.reserve();
  let failed: { error: unknown } | undefined;
  let lost = false;
  // Rejects once any statement reports the connection lost: statements the driver queued on a
  // reserved connection behind one in flight are neither sent nor failed when it closes, so
  // nothing on it is awaited without this beside it.
  let onLost: (error: unknown) => void = () => {};
  const whenLost = new Promise<never>((_, reject) => {
    onLost = reject;
  });
  whenLost.catch(() => {});
  const note = (error: unknown) => {
    if (!lost && isConnectionLost(error)) {
      lost = true;
      onLost(error);
    }
  };
  const tx = preparing(c, (error) => {
    note(error);
    failed ??= { error };
  });
  const unlessLost = <R>(p: Promise<R>) => Promise.race([p, whenLost]);
  try {
    const begun = c.unsafe(`begin ${options}`).execute();
    begun.catch(note);
    let result: T;
    try {
      [, result] = await unlessLost(Promise.all([begun, fn(tx)]));
    } catch (e) {
      throw failed?.error ?? e;
    }
    const done = await unlessLost(c.unsafe("commit"));
    if (failed || done.command !== "COMMIT") {
      throw failed?.error ?? new Error(`transaction ended with ${done.command}`);
    }
    return result;
  } catch (e) {
    note(e);
    // After a COMMIT answered with ROLLBACK there is no transaction left: a warning, no error.
    if (!lost) await unlessLost(c.unsafe("rollback")).catch(note);
    throw e;
  } finally {
    if (!lost) c.release();
  }
}

// What the driver and the server say when the database cannot be reached or the session was
// ended under us: the driver's own codes, the socket's, and SQLSTATE class 08 (connection
// exception), 57P01–57P03 (the server shutting down, crashed, or starting up) and 53300 (no
// connection slot left).
const LOST_CODES = new Set([
  "CONNECTION_CLOSED",
  "CONNECTION_DESTROYED",
  "CONNECTION_ENDED",
  "CONNECT_TIMEOUT",
  "ECONNREFUSED",
  "ECONNRESET",
  "ECONNABORTED",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENOTFOUND",
  "EAI_AGAIN",
  "57P01",
  "57P02",
  "57P03",
  "53300",
]);

/** Whether `err` says the database is unreachable or dropped the session (not that a query was
 * wrong): such a request is answered 503, and may succeed when repeated. */
export function isConnectionLost(err: unknown): boolean {
  let e: unknown = err;
  for (let i = 0; i < 5 && e && typeof e === "object"; i++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && (LOST_CODES.has(code) || code.startsWith("08"))) return true;
    if (e instanceof AggregateError && e.errors.some(isConnectionLost)) return true;
    e = (e as { cause?: unknown }).cause;
  }
  return false;
}

/**
 * Runs `fn` again while it fails because the database is away, backing off from 100 ms to 2 s,
 * for at most `maxMs` and until `stop()`; then the last error is thrown. For work that must be
 * recorded and can be repeated (an agent's message: every one is idempotent to record).
 */
export async function retryWhileDatabaseAway<T>(
  fn: () => Promise<T>,
  opts: { maxMs: number; stop?: () => boolean },
): Promise<T> {
  const started = Date.now();
  for (let attempt = 0; ; attempt++) {
    try {
      return await fn();
    } catch (e) {
      if (!isConnectionLost(e) || opts.stop?.() || Date.now() - started >= opts.maxMs) throw e;
      await new Promise((r) => setTimeout(r, Math.min(100 * 2 ** attempt, 2000)));
    }
  }
}

/** Postgres error code of a failed query (drizzle wraps driver errors in `cause`). */
export function pgErrorCode(err: unknown): { code?: string; constraint?: string } {
  let e: unknown = err;
  for (let i = 0; i < 4 && e && typeof e === "object"; i++) {
    const rec = e as {
      code?: unknown;
      constraint_name?: unknown;
      constraint?: unknown;
      cause?: unknown;
    };
    if (typeof rec.code === "string" && /^[0-9A-Z]{5}$/.test(rec.code)) {
      const constraint = rec.constraint_name ?? rec.constraint;
      return {
        code: rec.code,
        constraint: typeof constraint === "string" ? constraint : undefined,
      };
    }
    e = rec.cause;
  }
  return {};
}

/** The database's clock: host liveness is written and judged by the same clock. */
export const now = sql`now()`;

const RETRYABLE = new Set(["40P01", "40001"]); // deadlock detected, serialization failure

/**
 * Runs `fn` again when Postgres aborts it to break a deadlock or a serialization conflict:
 * the loser of such a race simply runs again, instead of failing a request or dropping an
 * agent's message.
 */
async function retrying<T>(fn: () => Promise<T>, attempts = 5): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (e) {
      const { code } = pgErrorCode(e);
      if (!code || !RETRYABLE.has(code) || attempt >= attempts) throw e;
      await new Promise((r) => setTimeout(r, Math.random() * 10 * attempt));
    }
  }
}

/** A transaction, retried as above. */
export function transaction<T>(db: Db, fn: (tx: Tx) => Promise<T>, attempts = 5): Promise<T> {
  return retrying(() => db.transaction(fn), attempts);
}

/** A statement issued now and awaited later, if at all (see transactionEndingWith): its
 * failure is reported to whoever awaits it, never as an unhandled rejection. */
export function issued<T>(statement: Promise<T>): Promise<T> {
  statement.catch(() => {});
  return statement;
}

/**
 * A transaction whose last statements go out with its COMMIT: `fn` issues them without
 * awaiting and returns them in `last`. If one fails, the transaction rolls back and this
 * rejects with that statement's error — on a Postgres server through the transaction itself
 * (pipelinedTransaction), on PGlite (whose COMMIT of a failed transaction quietly rolls back)
 * when they are awaited after it.
 */
export async function transactionEndingWith<T>(
  db: Db,
  fn: (tx: Tx) => Promise<{ value: T; last: Promise<unknown>[] }>,
): Promise<T> {
  let last: Promise<PromiseSettledResult<unknown>[]> = Promise.resolve([]);
  // The statement that failed, not one refused after it because the transaction had failed.
  const cause = async () => {
    const failures = (await last).flatMap((r) => (r.status === "rejected" ? [r.reason] : []));
    return failures.find((e) => pgErrorCode(e).code !== "25P02") ?? failures[0];
  };
  let value: T;
  try {
    value = await transaction(db, async (tx) => {
      const r = await fn(tx);
      last = Promise.allSettled(r.last);
      return r.value;
    });
  } catch (e) {
    // PGlite reports a COMMIT that rolled back as an error of its own.
    throw (await cause()) ?? e;
  }
  const failed = await cause();
  if (failed !== undefined) throw failed;
  return value;
}

/** One raw statement (its own transaction unless `ex` is one), retried as above when it runs
 * on its own; returns its rows. */
export function statement(ex: Executor, query: SQL): Promise<Record<string, unknown>[]> {
  const run = async () => {
    // postgres.js returns the rows; PGlite a result with `rows`.
    const res = (await ex.execute(query)) as unknown;
    return (Array.isArray(res) ? res : (res as { rows: unknown[] }).rows) as Record<
      string,
      unknown
    >[];
  };
  return "rollback" in ex ? run() : retrying(run);
}

// The hot paths (every lifecycle call and fork) write their statements as `sql` templates run
// through statement(), rows in and out as JSON: drizzle's query builders cost about 0.25 ms of
// CPU per statement on top of the driver's (building, then mapping each column), measured on
// this project's 2-core machines, where the control plane is CPU-bound.

const columnLists = new WeakMap<PgTable, Array<[string, Column]>>();
/** A table's columns as [field name, column] pairs. */
function columnsOf(table: PgTable): Array<[string, Column]> {
  let list = columnLists.get(table);
  if (!list) {
    list = Object.entries(getTableColumns(table));
    columnLists.set(table, list);
  }
  return list;
}

/** A table row from its `to_jsonb()` form (column names → field names, values as drizzle
 * maps them from the driver). */
export function rowFromJson<T extends PgTable>(
  table: T,
  json: Record<string, unknown>,
): T["$inferSelect"] {
  const row: Record<string, unknown> = {};
  for (const [key, col] of columnsOf(table)) {
    const v = json[col.name];
    row[key] = v === null || v === undefined ? null : col.mapFromDriverValue(v);
  }
  return row as T["$inferSelect"];
}

/** A jsonb value as the driver hands it over (parsed, or as text). */
export function fromJsonb(v: unknown): unknown {
  return typeof v === "string" ? JSON.parse(v) : v;
}

/** The rows of a statement that selects `to_jsonb(…) as row`, as rows of `table`. */
export async function selectRows<T extends PgTable>(
  ex: Executor,
  table: T,
  query: SQL,
): Promise<T["$inferSelect"][]> {
  return (await statement(ex, query)).map((r) =>
    rowFromJson(table, fromJsonb(r.row) as Record<string, unknown>),
  );
}

/** A row in the form `jsonb_populate_recordset()` reads: the inverse of rowFromJson. */
function rowToJson<T extends PgTable>(table: T, row: T["$inferSelect"]): Record<string, unknown> {
  const json: Record<string, unknown> = {};
  const values = row as Record<string, unknown>;
  for (const [key, col] of columnsOf(table)) {
    const v = values[key];
    json[col.name] = v instanceof Date ? v.toISOString() : (v ?? null);
  }
  return json;
}

const insertHeads = new Map<string, string>();

/**
 * Inserts whole rows (every column given; no column default applies) as one JSON parameter,
 * so the statement's text is the same whatever the rows hold. Columns in `now` take the
 * database's clock instead of the row's value.
 */
export function insertRows<T extends PgTable>(
  table: T,
  rows: T["$inferSelect"][],
  opts: { now?: string[] } = {},
): SQL {
  const name = getTableName(table);
  const key = `${name}|${opts.now?.join(",") ?? ""}`;
  let head = insertHeads.get(key);
  if (!head) {
    const cols = columnsOf(table).map(([, c]) => c.name);
    const q = (c: string) => `"${c}"`;
    const picked = cols.map((c) => (opts.now?.includes(c) ? "now()" : q(c)));
    head = `insert into ${q(name)} (${cols.map(q).join(", ")}) select ${picked.join(", ")} from jsonb_populate_recordset(null::${q(name)}, `;
    insertHeads.set(key, head);
  }
  const json = JSON.stringify(rows.map((r) => rowToJson(table, r)));
  return sql`${sql.raw(head)}${json}::jsonb)`;
}
