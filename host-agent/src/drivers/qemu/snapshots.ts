// Snapshots as resources (standby and restore of an instance are snapshot.ts). A snapshot is a
// record like an instance's, in its own directory (paths.qemuSnapshots), made by the fork's own
// steps with the snapshot as the target: its disk is a reflink clone or, without reflinks, the
// frozen base the instance's disk was frozen into; its memory is the frozen memory base the
// instance and every fork of it map privately, plus a copy of the ~60 KB device state. Nothing
// of guest RAM is copied, and deleting the snapshot removes only its record and device state:
// the bases stay while any instance or snapshot refers to them.
import { mkdir, rename, rm, stat } from "node:fs/promises";
import type { ObservedInstance, SnapshotInfo } from "@offshoot/shared";
import { runSteps } from "../../operations/steps.ts";
import type { OpContext, OpData } from "../driver.ts";
import { exists, isMissing } from "../record-store.ts";
import { snapshotBytes } from "./compression.ts";
import { forkBetween, targetStateSteps } from "./fork.ts";
import { load, type QemuHost } from "./host.ts";
import { discard, gc } from "./processes.ts";
import type { QemuRecord } from "./store.ts";

export async function snapshotCreate(
  host: QemuHost,
  op: OpData<"snapshot_create">,
  ctx: OpContext,
): Promise<{ instance: ObservedInstance; snapshot: SnapshotInfo }> {
  const rec = await load(host, op.instance_id);
  const snaps = host.views.snapshots;
  const [instance] = await forkBetween(
    host,
    snaps,
    {
      source_id: op.instance_id,
      target: { ...rec.spec, id: op.snapshot_id },
      target_state: op.snapshot_kind,
    },
    ctx,
  );
  const snap = await load(snaps, op.snapshot_id);
  return {
    instance,
    snapshot: { id: op.snapshot_id, size_bytes: await snapshotBytes(snaps, snap) },
  };
}

/**
 * Puts a Stopped or Standby instance back to a snapshot. Its new files are made beside its old
 * ones (paths.qemuRestoring, by the fork's steps with the instance's own spec, so it keeps its
 * id, name, MAC and address), then swapped in by two renames; its console log is carried over.
 * A crash leaves one whole set in place (settleRestore). Then it is brought to `target_state`
 * as a fork would be: restored from the snapshot's memory, or booted.
 */
export async function snapshotRestore(
  host: QemuHost,
  op: OpData<"snapshot_restore">,
  ctx: OpContext,
): Promise<ObservedInstance> {
  const id = op.instance_id;
  const rec = await load(host, id);
  const snaps = host.views.snapshots;
  const snap = await load(snaps, op.snapshot_id);
  const withMemory = snap.observed.state === "Standby" && op.target_state !== "Stopped";
  const { restoring, replaced } = host.views;
  await settleRestore(host, id);
  await forkBetween(
    snaps,
    restoring,
    {
      source_id: op.snapshot_id,
      target: rec.spec,
      target_state: withMemory ? "Standby" : "Stopped",
    },
    ctx,
  );
  await mkdir(replaced.paths.instancesDir, { recursive: true });
  await rename(host.paths.instanceDir(id), replaced.paths.instanceDir(id));
  await rename(restoring.paths.instanceDir(id), host.paths.instanceDir(id));
  // The console log goes on in the same file, from its end.
  let serialOffset = 0;
  try {
    await rename(replaced.paths.serialLog(id), host.paths.serialLog(id));
    serialOffset = (await stat(host.paths.serialLog(id))).size;
  } catch (e) {
    if (!isMissing(e)) throw e;
  }
  const placed = await load(host, id);
  const next: QemuRecord = { ...placed, created_by: rec.created_by, serial_offset: serialOffset };
  await host.store.write(next);
  await ctx.steps.record("swap");
  await rm(replaced.paths.instanceDir(id), { recursive: true, force: true });
  await gc(host);
  const f = { host, from: snaps, source: snap, withMemory, rec: next };
  await runSteps(ctx.steps, targetStateSteps(f, op.target_state));
  return f.rec.observed;
}

/** After a restore cut short: the instance's old files go back if the new ones were not moved
 * in yet; whatever is left beside them is removed. */
export async function settleRestore(host: QemuHost, id: string): Promise<void> {
  const { restoring, replaced } = host.views;
  const old = replaced.paths.instanceDir(id);
  if (!(await exists(host.paths.instanceDir(id))) && (await exists(old))) {
    await rename(old, host.paths.instanceDir(id));
  }
  await rm(old, { recursive: true, force: true });
  await rm(restoring.paths.instanceDir(id), { recursive: true, force: true });
}

/** Removes a snapshot's record and device state, then the bases nothing uses any more. */
export async function snapshotDelete(host: QemuHost, id: string): Promise<void> {
  await discard(host.views.snapshots, id);
  await gc(host);
}
