import { NameConflictError } from "@offshoot/shared";
import { pgErrorCode } from "../../db/client.ts";

/** Maps the unique-name violation to the API's name_conflict; rethrows anything else. */
export function nameConflict(err: unknown, name: string): never {
  const { code, constraint } = pgErrorCode(err);
  if (code === "23505" && (constraint === undefined || constraint === "instances_tenant_name_uq")) {
    throw new NameConflictError(`an instance named ${name} already exists`);
  }
  throw err;
}
