// Runs one operation under its instance locks and turns any failure into an outcome with the
// instances as the host observes them afterwards, so a failed command still reports facts.
import {
  ApiError,
  type CommandError,
  isHostOperation,
  type ObservedInstance,
  type Operation,
} from "@offshoot/shared";
import type { Driver, OpContext } from "../drivers/driver.ts";
import type { Outcome } from "../journal.ts";
import { create } from "./create.ts";
import { deleteInstance } from "./delete.ts";
import { fork } from "./fork.ts";
import type { InstanceLocks } from "./locks.ts";
import { restore } from "./restore.ts";
import { snapshotCreate, snapshotRestore } from "./snapshots.ts";
import { standby } from "./standby.ts";
import { start } from "./start.ts";
import { stop } from "./stop.ts";

/** The instances an operation touches: what it locks and what it reports. */
export function instanceIds(op: Operation): string[] {
  if (isHostOperation(op)) return [];
  switch (op.kind) {
    case "create":
      return [op.instance.id];
    case "fork":
      // A snapshot holds still by itself: forks of one run side by side.
      return op.from_snapshot ? [op.target.id] : [op.source_id, op.target.id];
    // The snapshot's id is locked with the instance's; it names no instance, so it is never
    // reported as one.
    case "snapshot_create":
    case "snapshot_restore":
      return [op.instance_id, op.snapshot_id];
    default:
      return [op.instance_id];
  }
}

type Done = Omit<Extract<Outcome, { ok: true }>, "ok">;

async function dispatch(driver: Driver, op: Operation, ctx: OpContext): Promise<Done> {
  if (op.kind === "snapshot_create") return snapshotCreate(driver, op, ctx);
  return { instances: await dispatchInstances(driver, op, ctx) };
}

function dispatchInstances(
  driver: Driver,
  op: Operation,
  ctx: OpContext,
): Promise<ObservedInstance[]> {
  if (isHostOperation(op)) {
    throw new Error(`${op.kind} is run by the agent (host-ops.ts), not a driver`);
  }
  switch (op.kind) {
    case "create":
      return create(driver, op, ctx);
    case "start":
      return start(driver, op, ctx);
    case "stop":
      return stop(driver, op, ctx);
    case "standby":
      return standby(driver, op, ctx);
    case "restore":
      return restore(driver, op, ctx);
    case "delete":
      return deleteInstance(driver, op, ctx);
    case "fork":
      return fork(driver, op, ctx);
    case "snapshot_restore":
      return snapshotRestore(driver, op, ctx);
    case "snapshot_create":
      throw new Error("snapshot_create answers with its snapshot (dispatch)");
  }
}

export function toCommandError(err: unknown): CommandError {
  if (err instanceof ApiError) return { code: err.code, message: err.message };
  return { code: "internal_error", message: err instanceof Error ? err.message : String(err) };
}

/** The instances as observed now; a driver that cannot even read them reports none. */
export async function observe(driver: Driver, ids: readonly string[]): Promise<ObservedInstance[]> {
  const found: ObservedInstance[] = [];
  for (const id of ids) {
    const instance = await driver.get(id).catch(() => null);
    if (instance) found.push(instance);
  }
  return found;
}

export async function execute(
  driver: Driver,
  locks: InstanceLocks,
  op: Operation,
  ctx: OpContext,
): Promise<Outcome> {
  const ids = instanceIds(op);
  return locks.run(ids, async () => {
    try {
      return { ok: true, ...(await dispatch(driver, op, ctx)) };
    } catch (err) {
      return { ok: false, error: toCommandError(err), instances: await observe(driver, ids) };
    }
  });
}
