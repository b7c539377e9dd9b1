import type { ObservedInstance } from "@offshoot/shared";
import type { Driver, OpContext, OpData } from "../drivers/driver.ts";
import { requireState } from "./checks.ts";

export async function start(
  driver: Driver,
  op: OpData<"start">,
  ctx: OpContext,
): Promise<ObservedInstance[]> {
  await requireState(driver, op.instance_id, "start");
  return [await driver.start(op, ctx)];
}
