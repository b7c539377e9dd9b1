import type { ObservedInstance } from "@offshoot/shared";
import type { Driver, OpContext, OpData } from "../drivers/driver.ts";
import { checkSpec, requireAbsent } from "./checks.ts";

export async function create(
  driver: Driver,
  op: OpData<"create">,
  ctx: OpContext,
): Promise<ObservedInstance[]> {
  checkSpec(driver.capabilities(), op.instance);
  await requireAbsent(driver, op.instance.id);
  return [await driver.create(op.instance, ctx)];
}
