import { AmbiguousError, NotFoundError } from "@offshoot/shared";
import { and, eq, like, or, type SQL, sql } from "drizzle-orm";
import { type Executor, issued, type Tx } from "../../db/client.ts";
import { type InstanceRow, instances } from "../../db/schema/index.ts";
import type { Services } from "../context.ts";

const escapeLike = (s: string) => s.replace(/[\\%_]/g, (c) => `\\${c}`);

/**
 * `{id}` in a path is an id, an exact name, or a unique id prefix, tried in that order and
 * always within the caller's tenant: another tenant's instance is simply not found.
 */
export async function resolveInstance(
  ex: Executor,
  tenantId: string,
  ref: string,
  opts: { forUpdate?: boolean } = {},
): Promise<InstanceRow> {
  if (ref.length === 0 || ref.length > 128) throw new NotFoundError(`instance ${ref} not found`);
  const lock = <T extends { for: (s: "update") => unknown }>(q: T) =>
    (opts.forUpdate ? q.for("update") : q) as T;
  // Issued at once (see lockAndCheck: statements may be queued right behind it).
  const exact = await lock(
    ex
      .select()
      .from(instances)
      .where(
        and(eq(instances.tenantId, tenantId), or(eq(instances.id, ref), eq(instances.name, ref))),
      )
      .limit(2),
  ).execute();
  const match = exact.find((r) => r.id === ref) ?? exact.find((r) => r.name === ref);
  if (match) return match;
  // Two rows are enough to tell unique from ambiguous.
  const prefixed = await lock(
    ex
      .select()
      .from(instances)
      .where(and(eq(instances.tenantId, tenantId), like(instances.id, `${escapeLike(ref)}%`)))
      .limit(2),
  );
  if (prefixed.length === 1 && prefixed[0]) return prefixed[0];
  if (prefixed.length > 1) {
    throw new AmbiguousError(
      `"${ref}" matches several instance ids; use more of the id or the name`,
    );
  }
  throw new NotFoundError(`instance ${ref} not found`);
}

/**
 * Resolves and locks the row for the rest of the transaction, in one statement. (A prefix
 * that matches several rows locks them all for a moment before it is refused as ambiguous.)
 */
export function lockInstance(tx: Tx, tenantId: string, ref: string): Promise<InstanceRow> {
  return resolveInstance(tx, tenantId, ref, { forUpdate: true });
}

/**
 * Locks the instance `ref` names (lockInstance) and runs `checks` on it in the same round trip:
 * the statements `checks` issues go out right behind the lock on the transaction's connection,
 * so they run once the lock is held, each with a snapshot taken after it; they name the
 * instance and its host by subqueries on its exact id or name. When `ref` turns out to be an id
 * prefix, those results are dropped and `checks` runs again with the instance's own ids.
 */
export async function lockAndCheck<T>(
  tx: Tx,
  tenantId: string,
  ref: string,
  checks: (instanceId: string | SQL, hostId: string | SQL) => Promise<T>,
): Promise<{ row: InstanceRow; checked: T }> {
  const named = (column: SQL) =>
    sql`(select ${column} from ${instances} where ${instances.tenantId} = ${tenantId} and (${instances.id} = ${ref} or ${instances.name} = ${ref}) order by ${instances.id} = ${ref} desc limit 1)`;
  const locking = lockInstance(tx, tenantId, ref);
  const early = issued(checks(named(sql`${instances.id}`), named(sql`${instances.hostId}`)));
  const row = await locking;
  if (row.id === ref || row.name === ref) return { row, checked: await early };
  await early.catch(() => {});
  return { row, checked: await checks(row.id, row.hostId) };
}

export async function getById(ex: Executor, tenantId: string, id: string): Promise<InstanceRow> {
  const [row] = await ex
    .select()
    .from(instances)
    .where(and(eq(instances.id, id), eq(instances.tenantId, tenantId)));
  if (!row) throw new NotFoundError(`instance ${id} not found`);
  return row;
}

/** Instance `id` as operation `opId` left it: the row its result wrote, if this process
 * recorded that result, else read from the database. */
export async function rowAfter(
  s: Services,
  tenantId: string,
  opId: string,
  id: string,
): Promise<InstanceRow> {
  return s.ops.writtenBy(opId, id) ?? getById(s.db, tenantId, id);
}
