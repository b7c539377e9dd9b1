// Fork without copying: a Stopped or Standby source is cloned into a target brought to its
// target state (a Running source is put in Standby first, by the control plane). The disk is a
// reflink clone where the data dir makes them, otherwise qcow2 overlays on the source's frozen
// disk; guest RAM is never copied: the source's RAM file is frozen into a read-only memory base
// that the source and every fork of that snapshot map privately (each guest's writes land in its
// own pages), and only the ~60 KB device state is copied. Bases go when nothing refers to them.
import { randomBytes } from "node:crypto";
import { chmod, copyFile, mkdir, rename } from "node:fs/promises";
import { InvalidStateError, type ObservedInstance } from "@offshoot/shared";
import { runSteps, type Step } from "../../operations/steps.ts";
import type { OpContext, OpData } from "../driver.ts";
import { exists } from "../record-store.ts";
import { boot, writeConfig } from "./boot.ts";
import { thaw } from "./compression.ts";
import {
  canReflink,
  copyMemory,
  createOverlay,
  freezeDisk,
  reflinkDisk,
  unfreezeDisk,
} from "./disks.ts";
import { guestConfig, macFor, machineFor } from "./guest-config.ts";
import { load, now, type QemuHost } from "./host.ts";
import { prepareNic } from "./nic.ts";
import { discard, kill, makeInstanceDir } from "./processes.ts";
import { resume, snapshot } from "./snapshot.ts";
import type { Machine, QemuRecord } from "./store.ts";

/** A fork under way: what its steps read, and the target's record as they have made it. */
export interface Fork {
  /** Where the target goes (instances, snapshots, or a restore's new files). */
  readonly host: QemuHost;
  /** Where the source is (instances or snapshots). */
  readonly from: QemuHost;
  readonly source: QemuRecord;
  /** The target starts from the source's snapshot (a Standby source, a target not Stopped). */
  readonly withMemory: boolean;
  rec: QemuRecord;
}

export function fork(
  host: QemuHost,
  op: OpData<"fork">,
  ctx: OpContext,
): Promise<[ObservedInstance, ObservedInstance]> {
  return forkBetween(op.from_snapshot ? host.views.snapshots : host, host, op, ctx);
}

/**
 * Clones `op.source_id` of `from` into `op.target` of `to`. Instance to instance is a fork;
 * instance to snapshots is a snapshot's capture (target_state its kind: nothing boots);
 * snapshots to instances is a fork from a snapshot; `nic: false` leaves the target's TAP to
 * whoever moves it into place (a snapshot restore).
 */
export async function forkBetween(
  from: QemuHost,
  host: QemuHost,
  op: OpData<"fork">,
  ctx: OpContext,
  { nic = host.paths === host.views.instances.paths } = {},
): Promise<[ObservedInstance, ObservedInstance]> {
  const { source_id, target_state } = op;
  const source = await load(from, source_id);
  const state = source.observed.state;
  if (state !== "Stopped" && state !== "Standby") {
    throw new InvalidStateError(
      `cannot fork instance ${source_id} in state ${state}: the qemu driver forks Stopped or Standby sources`,
    );
  }
  const withMemory = state === "Standby" && target_state !== "Stopped";
  // A snapshot kept compressed is read from its decompressed copy, made by the first reader.
  const thawed = withMemory ? await thaw(from, source) : { rec: source, done: () => {} };
  try {
    return await forkThawed(from, host, op, ctx, thawed.rec, withMemory, nic);
  } finally {
    thawed.done();
  }
}

async function forkThawed(
  from: QemuHost,
  host: QemuHost,
  op: OpData<"fork">,
  ctx: OpContext,
  source: QemuRecord,
  withMemory: boolean,
  nic: boolean,
): Promise<[ObservedInstance, ObservedInstance]> {
  const { source_id, target_state } = op;
  const f: Fork = {
    host,
    from,
    source,
    withMemory,
    rec: targetRecord(op, source, withMemory, ctx),
  };
  host.reflinks ??= canReflink(host.paths.instancesDir);
  const reflink = (await host.reflinks) && source.disk_base === null;
  host.last.diskClone = reflink ? "reflink" : "overlay";
  // The target's TAP is made while its disk is cloned; its restore or boot waits for it, and
  // undoing the fork (discard) removes it once made.
  if (nic) void prepareNic(host, f.rec).catch(() => {});
  await runSteps(ctx.steps, [
    ...diskSteps(f, reflink),
    ...memorySteps(f),
    { name: "register", run: () => host.store.write(f.rec) },
    ...targetStateSteps(f, target_state),
  ]);
  return [(await load(from, source_id)).observed, f.rec.observed];
}

/** The target's record as registered: Stopped, or Standby on the source's snapshot. */
function targetRecord(
  { target }: OpData<"fork">,
  source: QemuRecord,
  withMemory: boolean,
  ctx: OpContext,
): QemuRecord {
  // The device-state stream fixes the layout: a fork of a snapshot keeps the source's
  // devices (a NIC only if the source had one) and takes the target's MAC.
  const machine: Machine = withMemory
    ? {
        ...source.machine,
        mac: source.machine.mac === null ? null : macFor(target),
      }
    : machineFor(target);
  // The fork's disk was written over the source's rootfs, so it keeps that image (even if
  // the name has since been imported again with other contents).
  const image = source.image;
  guestConfig(target, image);
  return {
    created_by: ctx.commandId,
    spec: target,
    image,
    machine,
    pid: null,
    serial_offset: 0,
    // A snapshot whose RAM is in the stream keeps it there; otherwise the target maps the
    // frozen memory base (set by the freeze-memory step).
    ram: withMemory && source.ram === "stream" ? "stream" : "file",
    ram_base: null,
    disk_base: null,
    compressed: null,
    guest_identity: withMemory ? source.guest_identity : null,
    observed: {
      id: target.id,
      state: withMemory ? "Standby" : "Stopped",
      has_snapshot: withMemory,
      state_error: null,
      exit_code: null,
      exit_message: null,
      started_at: null,
      stopped_at: withMemory ? null : now(),
    },
  };
}

/** The target's disk (and its config disk): a reflink clone, or an overlay on a frozen base. A
 * snapshot's disk, in overlay mode, is the frozen base itself (it is never written): a fork
 * from it overlays that base directly, and a snapshot keeps no overlay of its own. */
function diskSteps(f: Fork, reflink: boolean): Step[] {
  const { host, source } = f;
  const id = f.rec.observed.id;
  const sourceDisk = f.from.paths.diskFile(source.observed.id);
  let base = source.disk_base ?? "";
  const toSnapshot = host.paths === host.views.snapshots.paths;
  const steps: Step[] = [];
  if (!reflink && source.disk_base === null) {
    steps.push({
      name: "freeze-disk",
      run: async () => {
        base = await freezeDisk(host.tools, host.paths, sourceDisk, source.spec.overlay_bytes);
      },
      undo: () => unfreezeDisk(sourceDisk, base),
    });
  }
  steps.push({
    name: "clone-disk",
    run: async () => {
      await makeInstanceDir(host, id);
      if (reflink) await reflinkDisk(sourceDisk, host.paths.diskFile(id));
      else if (toSnapshot) f.rec = { ...f.rec, disk_base: base };
      else {
        const bytes = Math.max(f.rec.spec.overlay_bytes, source.spec.overlay_bytes);
        await createOverlay(host.tools, host.paths.diskFile(id), base, bytes);
      }
      await writeConfig(host, f.rec);
    },
    undo: () => discard(host, id),
  });
  return steps;
}

/** From a snapshot: the memory base the target maps, and the source's device state. */
function memorySteps(f: Fork): Step[] {
  const { host, source, from } = f;
  if (!f.withMemory) return [];
  const steps: Step[] = [];
  if (source.ram !== "stream") {
    steps.push({
      name: "freeze-memory",
      run: async () => {
        const base = await freezeMemory(from, source);
        f.rec = { ...f.rec, ram: "base", ram_base: base };
      },
      undo: () => unfreezeMemory(from, source),
    });
  }
  steps.push({
    name: "clone-memory",
    run: async () => {
      // Device state only (~60 KB), unless the snapshot carries the RAM in its stream.
      const src = from.paths.devStateFile(source.observed.id);
      const to = host.paths.devStateFile(f.rec.observed.id);
      if (source.ram === "stream") host.last.copyPath = await copyMemory(src, to);
      else {
        await copyFile(src, to);
        host.last.copyPath = "frozen-base";
      }
    },
  });
  return steps;
}

/** From the registered target (Stopped, or Standby on a snapshot) to the target state. */
export function targetStateSteps(f: Fork, targetState: OpData<"fork">["target_state"]): Step[] {
  const { host, withMemory } = f;
  if (targetState === "Running") {
    return [
      {
        name: withMemory ? "restore" : "boot",
        run: async () => {
          f.rec = withMemory ? await resume(host, f.rec) : await boot(host, f.rec);
        },
      },
    ];
  }
  if (targetState === "Standby" && !withMemory) {
    // A Stopped source has no memory to clone: boot the fork, then snapshot it.
    return [
      {
        name: "boot",
        run: async () => {
          f.rec = await boot(host, f.rec);
        },
        undo: async () => {
          if (f.rec.pid !== null) await kill(host, f.rec.observed.id, f.rec.pid);
        },
      },
      {
        name: "snapshot",
        run: async () => {
          f.rec = await snapshot(host, f.rec, async () => {});
        },
      },
    ];
  }
  return [];
}

/**
 * Makes a Standby source's RAM file a read-only memory base and points the source at it.
 * The record is written first, so a crash before the rename is finished by converge().
 */
async function freezeMemory(host: QemuHost, source: QemuRecord): Promise<string> {
  if ((source.ram === "base" || source.ram === "frozen") && source.ram_base !== null) {
    return source.ram_base;
  }
  const id = source.observed.id;
  const base = host.paths.memBaseFile(randomBytes(8).toString("hex"));
  await mkdir(host.paths.memBasesDir, { recursive: true });
  await host.store.write({ ...source, ram: "frozen", ram_base: base });
  await rename(host.paths.memFile(id), base);
  await chmod(base, 0o444);
  return base;
}

/** Undoes freezeMemory while no fork uses the base yet. */
async function unfreezeMemory(host: QemuHost, source: QemuRecord): Promise<void> {
  const read = await host.store.read(source.observed.id);
  if (read.kind !== "ok" || source.ram !== "file") return;
  const base = read.record.ram_base;
  if (read.record.ram === "frozen" && base !== null && (await exists(base))) {
    await chmod(base, 0o644);
    await rename(base, host.paths.memFile(source.observed.id));
  }
  await host.store.write({ ...read.record, ram: "file", ram_base: null });
}
