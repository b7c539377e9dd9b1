import type { ObservedInstance } from "@offshoot/shared";
import type { Driver, OpContext, OpData } from "../drivers/driver.ts";
import { requireState } from "./checks.ts";

export async function restore(
  driver: Driver,
  op: OpData<"restore">,
  ctx: OpContext,
): Promise<ObservedInstance[]> {
  await requireState(driver, op.instance_id, "restore");
  return [await driver.restore(op.instance_id, ctx)];
}
