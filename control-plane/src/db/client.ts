import { getTableColumns, type SQL, sql } from "drizzle-orm";
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
  /** Resolves once listening; returns the unlisten function. */
  listen(channel: string, fn: (payload: string) => void): Promise<() => Promise<void>>;
  notify(channel: string, payload: string): Promise<void>;
}

/** A Postgres server (or Hyperdrive) connection: no migrations, nothing read from disk, so
 * this module also runs inside workerd. */
export function connectPostgres(url: string, opts: { max?: number } = {}): Database {
  const client = postgres(url, { max: opts.max ?? 10, onnotice: () => {} });
  const db = drizzlePostgres(preparing(client)) as unknown as Db;
  const pubsub: PubSub = {
    // postgres.js keeps one dedicated connection for LISTEN and re-listens after a reconnect.
    listen: async (channel, fn) => {
      const { unlisten } = await client.listen(channel, fn);
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
 */
function preparing<T extends postgres.Sql | postgres.TransactionSql>(client: T): T {
  return new Proxy(client, {
    get(target, prop, receiver) {
      if (prop === "unsafe") {
        return (query: string, params: never[], options?: object) =>
          target.unsafe(query, params, { ...options, prepare: true });
      }
      if (prop === "begin" && "begin" in target) {
        return (...args: unknown[]) => {
          const fn = args.at(-1) as (tx: postgres.TransactionSql) => unknown;
          const begin = target.begin as (...a: unknown[]) => unknown;
          return begin(...args.slice(0, -1), (tx: postgres.TransactionSql) => fn(preparing(tx)));
        };
      }
      const value: unknown = Reflect.get(target, prop, receiver);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
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

/** A table row from its `to_jsonb()` form (column names → field names, values as drizzle
 * maps them from the driver). */
export function rowFromJson<T extends PgTable>(
  table: T,
  json: Record<string, unknown>,
): T["$inferSelect"] {
  const row: Record<string, unknown> = {};
  for (const [key, col] of Object.entries(getTableColumns(table))) {
    const v = json[col.name];
    row[key] = v === null || v === undefined ? null : col.mapFromDriverValue(v);
  }
  return row as T["$inferSelect"];
}
