import type { ObservedInstance } from "@offshoot/shared";
import type { Driver, OpContext, OpData } from "../drivers/driver.ts";
import { requireState } from "./checks.ts";

export async function stop(
  driver: Driver,
  op: OpData<"stop">,
  ctx: OpContext,
): Promise<ObservedInstance[]> {
  await requireState(driver, op.instance_id, "stop");
  return [await driver.stop(op.instance_id, ctx)];
}
