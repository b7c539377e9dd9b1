import { NotSupportedError, type ObservedInstance } from "@offshoot/shared";
import type { Driver, OpContext, OpData } from "../drivers/driver.ts";
import { requireState } from "./checks.ts";

export async function standby(
  driver: Driver,
  op: OpData<"standby">,
  ctx: OpContext,
): Promise<ObservedInstance[]> {
  if (!driver.capabilities().standby) {
    throw new NotSupportedError(`the ${driver.name} driver cannot put instances in standby`);
  }
  await requireState(driver, op.instance_id, "standby");
  return [await driver.standby(op.instance_id, ctx)];
}
