import { InvalidStateError, NotSupportedError, type ObservedInstance } from "@offshoot/shared";
import type { Driver, OpContext, OpData } from "../drivers/driver.ts";
import { checkSpec, requireAbsent, requireInstance } from "./checks.ts";

/** Forks on this host (where the copy-on-write data is). A Running source is the control
 * plane's to orchestrate — standby, fork, restore — so the source must hold still here. */
export async function fork(
  driver: Driver,
  op: OpData<"fork">,
  ctx: OpContext,
): Promise<ObservedInstance[]> {
  const caps = driver.capabilities();
  checkSpec(caps, op.target);
  await requireAbsent(driver, op.target.id);
  // A snapshot holds still by itself: the driver reads it from its snapshots.
  if (op.from_snapshot) return driver.fork(op, ctx);
  const source = await requireInstance(driver, op.source_id);
  const supported: Partial<Record<ObservedInstance["state"], boolean>> = {
    Stopped: caps.fork_from_stopped,
    Standby: caps.fork_from_standby,
  };
  const can = supported[source.state];
  if (can === undefined) {
    throw new InvalidStateError(
      `cannot fork instance ${op.source_id} in state ${source.state}: the host forks Stopped or Standby sources (a Running source is put in standby first)`,
    );
  }
  if (!can)
    throw new NotSupportedError(`the ${driver.name} driver cannot fork a ${source.state} instance`);
  return driver.fork(op, ctx);
}
