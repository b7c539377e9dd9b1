import { NameConflictError } from "@offshoot/shared";
import { sql } from "drizzle-orm";
import { type Executor, pgErrorCode, statement } from "../../db/client.ts";

/** The tenant already has an instance of this name. */
export const nameTaken = (name: string) =>
  new NameConflictError(`an instance named ${name} already exists`);

/** Whether the tenant has an instance named `name` (the unique index is what stops a race; this
 * only lets the conflict be reported before other checks, as Hypeman does). */
export async function nameInUse(ex: Executor, tenantId: string, name: string): Promise<boolean> {
  const [r] = await statement(
    ex,
    sql`select exists(select 1 from instances where tenant_id = ${tenantId} and name = ${name}) as taken`,
  );
  return r?.taken === true;
}

/** Maps the unique-name violation to the API's name_conflict; rethrows anything else. */
export function nameConflict(err: unknown, name: string): never {
  const { code, constraint } = pgErrorCode(err);
  if (code === "23505" && (constraint === undefined || constraint === "instances_tenant_name_uq")) {
    throw nameTaken(name);
  }
  throw err;
}
