// Snapshots as resources: a snapshot is captured from a Stopped or Standby instance (a Running
// one is put in standby and restored by the control plane, as for a fork), forked from with
// `fork` + from_snapshot, restored into an instance, and deleted. Each shares files
// copy-on-write with the instance it came from and the forks made from it.
import { InvalidStateError, type ObservedInstance, type SnapshotInfo } from "@offshoot/shared";
import type { Driver, OpContext, OpData } from "../drivers/driver.ts";
import { requireInstance } from "./checks.ts";

export async function snapshotCreate(
  driver: Driver,
  op: OpData<"snapshot_create">,
  ctx: OpContext,
): Promise<{ instances: ObservedInstance[]; snapshot: SnapshotInfo }> {
  const source = await requireInstance(driver, op.instance_id);
  // A Stopped snapshot is the disk alone, taken from a Stopped instance; a Standby one is the
  // disk and the memory of an instance in Standby.
  if (source.state !== op.snapshot_kind) {
    throw new InvalidStateError(
      `a ${op.snapshot_kind} snapshot needs its instance ${op.snapshot_kind}, and ${op.instance_id} is ${source.state}`,
    );
  }
  const { instance, snapshot } = await driver.snapshotCreate(op, ctx);
  return { instances: [instance], snapshot };
}

export async function snapshotRestore(
  driver: Driver,
  op: OpData<"snapshot_restore">,
  ctx: OpContext,
): Promise<ObservedInstance[]> {
  const instance = await requireInstance(driver, op.instance_id);
  if (instance.state !== "Stopped" && instance.state !== "Standby") {
    throw new InvalidStateError(
      `cannot restore instance ${op.instance_id} to a snapshot while it is ${instance.state} (needs Stopped or Standby)`,
    );
  }
  return [await driver.snapshotRestore(op, ctx)];
}
