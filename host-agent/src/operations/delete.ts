import type { ObservedInstance } from "@offshoot/shared";
import type { Driver, OpContext, OpData } from "../drivers/driver.ts";

/** Any state, Unknown included, and a missing instance is already deleted: the control plane
 * may re-send a delete whose first result it never saw. */
export async function deleteInstance(
  driver: Driver,
  op: OpData<"delete">,
  ctx: OpContext,
): Promise<ObservedInstance[]> {
  await driver.delete(op.instance_id, ctx);
  return [];
}
