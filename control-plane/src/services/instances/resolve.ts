import { AmbiguousError, NotFoundError } from "@offshoot/shared";
import { and, eq, like, or } from "drizzle-orm";
import type { Executor, Tx } from "../../db/client.ts";
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
  const exact = await lock(
    ex
      .select()
      .from(instances)
      .where(
        and(eq(instances.tenantId, tenantId), or(eq(instances.id, ref), eq(instances.name, ref))),
      )
      .limit(2),
  );
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
