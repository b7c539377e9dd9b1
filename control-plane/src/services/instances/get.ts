import type { Instance } from "@offshoot/shared";
import type { Services } from "../context.ts";
import { present } from "./present.ts";
import { resolveInstance } from "./resolve.ts";

/** GET /instances/{id}: by id, exact name or unique id prefix. */
export async function getInstance(s: Services, tenantId: string, ref: string): Promise<Instance> {
  return present(await resolveInstance(s.db, tenantId, ref));
}
