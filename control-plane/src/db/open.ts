// Opening the database on Node: migrations applied first (drizzle-kit's SQL in migrations/),
// Postgres server or embedded PGlite. The Worker connects with db/client.ts alone.
import { linkSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { PGlite } from "@electric-sql/pglite";
import { drizzle as drizzlePglite } from "drizzle-orm/pglite";
import { migrate as migratePglite } from "drizzle-orm/pglite/migrator";
import { drizzle as drizzlePostgres } from "drizzle-orm/postgres-js";
import { migrate as migratePostgres } from "drizzle-orm/postgres-js/migrator";
import postgres from "postgres";
import { postgresDriverPatched } from "../../../scripts/patch-postgres.ts";
import {
  CONNECT_TIMEOUT_S,
  connectPostgres,
  type Database,
  type Db,
  isConnectionLost,
} from "./client.ts";

export const MIGRATIONS_DIR = fileURLToPath(new URL("../../../migrations", import.meta.url));

// Several control-plane processes may start at once against one database; the advisory lock
// makes them apply migrations one at a time (the key is arbitrary but fixed).
const MIGRATION_LOCK = 727_001;

/** The driver as installed must carry scripts/patch-postgres.ts's fixes: unpatched, a Postgres
 * restart under load ends this process (porsager/postgres#1208). */
function requirePatchedDriver(): void {
  if (!postgresDriverPatched()) {
    throw new Error(
      "the postgres driver is not patched for connection loss; run `npx tsx scripts/patch-postgres.ts` (npm ci runs it)",
    );
  }
}

export async function openPostgres(
  url: string,
  opts: { max?: number; onUnavailable?: (error: unknown, retryMs: number) => void } = {},
): Promise<Database> {
  requirePatchedDriver();
  // A database that is not up yet (or restarting) is waited for, not a reason to exit.
  for (let attempt = 0; ; attempt++) {
    const migrator = postgres(url, {
      max: 1,
      onnotice: () => {},
      connect_timeout: CONNECT_TIMEOUT_S,
    });
    try {
      await migrator`select pg_advisory_lock(${MIGRATION_LOCK})`;
      await migratePostgres(drizzlePostgres(migrator), { migrationsFolder: MIGRATIONS_DIR });
      await migrator`select pg_advisory_unlock(${MIGRATION_LOCK})`;
      break;
    } catch (e) {
      if (!isConnectionLost(e) || !opts.onUnavailable) throw e;
      const retryMs = Math.min(250 * 2 ** attempt, 5000);
      opts.onUnavailable(e, retryMs);
      await new Promise((r) => setTimeout(r, retryMs));
    } finally {
      await migrator.end({ timeout: 1 });
    }
  }
  return connectPostgres(url, opts);
}

export async function openPglite(dataDir: string): Promise<Database> {
  mkdirSync(dataDir, { recursive: true });
  const unlock = lockPglite(dataDir);
  try {
    const client = await PGlite.create(dataDir);
    const db = drizzlePglite(client);
    await migratePglite(db, { migrationsFolder: MIGRATIONS_DIR });
    const close = async () => {
      try {
        await client.close();
      } finally {
        unlock();
      }
    };
    return { db: db as unknown as Db, kind: "pglite", close };
  } catch (e) {
    unlock();
    throw e;
  }
}

/** The embedded database is held by another process (`npm start`, say). */
export class PgliteInUseError extends Error {
  constructor(
    readonly dataDir: string,
    readonly pid: number,
  ) {
    super(
      `the embedded database under ${dataDir} is in use by another process (pid ${pid}; npm start?); stop it first, or set DATABASE_URL`,
    );
    this.name = "PgliteInUseError";
  }
}

// PGlite serves one process at a time and does not notice a second one (its postmaster.pid
// always says -42): two processes on its files corrupt them, or the second aborts inside its
// WASM. So whoever opens it holds <dataDir>/offshoot.lock, which names its pid, until it
// closes. The file is linked into place whole (no reader sees it half written); one whose
// process is gone (kill -9) is stale and taken over.
const LOCK_FILE = "offshoot.lock";

function lockPglite(dataDir: string): () => void {
  const file = path.join(dataDir, LOCK_FILE);
  const mine = `${file}.${process.pid}`;
  writeFileSync(mine, `${process.pid}\n`);
  try {
    for (let attempt = 0; ; attempt++) {
      try {
        linkSync(mine, file);
        break;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "EEXIST" || attempt === 3) throw e;
      }
      const holder = lockHolder(file);
      if (holder !== undefined && processAlive(holder)) {
        throw new PgliteInUseError(dataDir, holder);
      }
      rmSync(file, { force: true }); // stale, or gone meanwhile: try again
    }
  } finally {
    rmSync(mine, { force: true });
  }
  return () => {
    if (lockHolder(file) === process.pid) rmSync(file, { force: true });
  };
}

function lockHolder(file: string): number | undefined {
  try {
    const pid = Number.parseInt(readFileSync(file, "utf8"), 10);
    return pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
  // A killed process its parent has not reaped yet still takes signals: a zombie holds nothing.
  try {
    return !/^\d+ \(.*\) Z/s.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return true; // no /proc: take the signal's word
  }
}

export async function openDatabase(opts: {
  url?: string;
  pgliteDir: string;
  onUnavailable?: (error: unknown, retryMs: number) => void;
}): Promise<Database> {
  return opts.url
    ? openPostgres(opts.url, { onUnavailable: opts.onUnavailable })
    : openPglite(opts.pgliteDir);
}
