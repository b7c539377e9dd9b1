import { AmbiguousError, NotFoundError } from "@offshoot/shared";
import { type SQL, sql } from "drizzle-orm";
import { type Executor, selectRows, type Tx } from "../../db/client.ts";
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
  const lock = opts.forUpdate ? sql` for update` : sql``;
  const rows = (where: SQL) =>
    selectRows(
      ex,
      instances,
      sql`select to_jsonb(i.*) as row from instances i where i.tenant_id = ${tenantId} and ${where} limit 2${lock}`,
    );
  const exact = await rows(sql`(i.id = ${ref} or i.name = ${ref})`);
  const match = exact.find((r) => r.id === ref) ?? exact.find((r) => r.name === ref);
  if (match) return match;
  // Two rows are enough to tell unique from ambiguous.
  const prefixed = await rows(sql`i.id like ${`${escapeLike(ref)}%`}`);
  if (prefixed.length === 1 && prefixed[0]) return prefixed[0];
  if (prefixed.length > 1) {
    throw new AmbiguousError(
      `"${ref}" matches several instance ids; use more of the id or the name`,
    );
  }
  throw new NotFoundError(`instance ${ref} not found`);
}

/**
 * A column of the instance `ref` names exactly (its id, else its name), as a subquery: the
 * choice resolveInstance() makes without a prefix. Lets statements about the instance go out
 * on a transaction's connection before its row has come back (see forkInstance); they apply
 * only if the row that does come back is one `ref` names exactly (namesExactly).
 */
export function exactly(tenantId: string, ref: string, column: "id" | "host_id"): SQL {
  return sql`(select ${sql.raw(column)} from instances where tenant_id = ${tenantId} and (id = ${ref} or name = ${ref}) order by id = ${ref} desc limit 1)`;
}

export const namesExactly = (row: InstanceRow, ref: string) => row.id === ref || row.name === ref;

/**
 * Resolves and locks the row for the rest of the transaction, in one statement. (A prefix
 * that matches several rows locks them all for a moment before it is refused as ambiguous.)
 */
export function lockInstance(tx: Tx, tenantId: string, ref: string): Promise<InstanceRow> {
  return resolveInstance(tx, tenantId, ref, { forUpdate: true });
}

export async function getById(ex: Executor, tenantId: string, id: string): Promise<InstanceRow> {
  const [row] = await selectRows(
    ex,
    instances,
    sql`select to_jsonb(i.*) as row from instances i where i.id = ${id} and i.tenant_id = ${tenantId}`,
  );
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
