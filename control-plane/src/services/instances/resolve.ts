import { AmbiguousError, NotFoundError } from "@offshoot/shared";
import { and, eq, like, or } from "drizzle-orm";
import type { Executor, Tx } from "../../db/client.ts";
import { type InstanceRow, instances } from "../../db/schema/index.ts";

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
  const query = ex
    .select()
    .from(instances)
    .where(
      and(
        eq(instances.tenantId, tenantId),
        or(
          eq(instances.id, ref),
          eq(instances.name, ref),
          like(instances.id, `${escapeLike(ref)}%`),
        ),
      ),
    )
    .limit(20);
  const rows = await (opts.forUpdate ? query.for("update") : query);
  const match =
    rows.find((r) => r.id === ref) ??
    rows.find((r) => r.name === ref) ??
    (rows.length === 1 ? rows[0] : undefined);
  if (match) return match;
  if (rows.length > 1) {
    throw new AmbiguousError(
      `"${ref}" matches ${rows.length} instances; use more of the id or the name`,
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
