// The QEMU driver: real microvm guests (launch.ts), one directory and one JSON record per
// instance (store.ts). QEMU runs detached, so guests outlive the agent; a restarted agent finds
// them by the recorded pid and the QMP socket path.
//
// Standby keeps guest RAM in its memory-backend-file and writes only the device state with
// `migrate` + x-ignore-shared (FACTS.md: QEMU 7.2 has no `file:` URI, so `exec:cat > FILE`).
// Restore maps the same RAM file and loads the device state with `-incoming defer`. A fork never
// copies guest RAM: the source's RAM file is frozen into a read-only memory base that the source
// and every fork of that snapshot map privately (MAP_PRIVATE: each guest's writes land in its own
// pages), and the target gets a qcow2 overlay on the source's frozen disk. A guest running on a
// memory base writes its RAM into the snapshot at its next standby (record.ram, store.ts).
// Bases, disk and memory, go when no instance refers to them any more.
//
// A guest's disks: the image's rootfs (shared, read-only), the instance's own ext4 (a qcow2 on a
// shared blank template, then on frozen bases after forks) and a config disk /init reads at boot
// (guestConfig). /init mounts the first two as overlayfs and runs the program there.
import { randomBytes } from "node:crypto";
import { chmod, copyFile, mkdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { constants as osConstants } from "node:os";
import { setTimeout as sleep } from "node:timers/promises";
import {
  ApiError,
  type DriverCapabilities,
  type ImageInfo,
  type InstanceSpec,
  InvalidStateError,
  NotFoundError,
  type ObservedInstance,
  type Operation,
} from "@offshoot/shared";
import type { ImageStore } from "../../images/store.ts";
import { runSteps, type Step } from "../../operations/steps.ts";
import type { AgentPaths } from "../../paths.ts";
import type { Driver, OpContext, OpData } from "../driver.ts";
import { running } from "../observed.ts";
import { exists, isMissing } from "../record-store.ts";
import { rollbackOperation } from "../rollback.ts";
import { askGuestToStop, setGuestIdentity } from "./control.ts";
import { isOurQemu, qemuPidsFor } from "./discovery.ts";
import {
  type CopyPath,
  canReflink,
  copyMemory,
  createInstanceDisk,
  createOverlay,
  freezeDisk,
  gcBases,
  gcMemBases,
  reflinkDisk,
  unfreezeDisk,
} from "./disks.ts";
import {
  guestConfig,
  guestHostname,
  identityOf,
  MIN_GUEST_MEMORY,
  macFor,
  machineFor,
  shellQuote,
} from "./guest-config.ts";
import { type Accel, type GuestSpec, guestDevices, killProcess, launchQemu } from "./launch.ts";
import { QmpClient } from "./qmp.ts";
import { type InitEvent, initEvents } from "./serial.ts";
import { type Machine, type QemuRecord, QemuStore } from "./store.ts";

export interface QemuDriverOptions {
  assets: { qemu: string; kernelElf: string; initramfs: string };
  accel: Accel;
  /** Where instances' images come from: a create names one this host has imported. */
  images: ImageStore;
  qemuImg?: string;
  /** Launch → /init's ready marker. Boot under TCG takes 3.5–5 s here (FACTS.md). */
  bootTimeoutMs?: number;
  /** Bound on one guest control-channel command (default 5 s). */
  controlTimeoutMs?: number;
  /** stop: how long a guest's program gets after SIGTERM before QEMU is quit (default 10 s). */
  stopTimeoutMs?: number;
  /** How often running guests' serial logs and processes are checked for an exit. */
  pollMs?: number;
}

const MiB = 1024 * 1024;
const QUIT_TIMEOUT_MS = 10_000;
const MIGRATE_TIMEOUT_MS = 60_000;
const CONTROL_TIMEOUT_MS = 5_000;
const STOP_TIMEOUT_MS = 10_000;
/** 7.2's default of 32 MiB/s would throttle the device-state stream for nothing. */
const MAX_BANDWIDTH = 10 * 1024 * MiB;

const now = () => new Date().toISOString();

export class QemuDriver implements Driver {
  readonly name = "qemu";
  private readonly store: QemuStore;
  private readonly paths: AgentPaths["qemu"];
  private readonly listeners = new Set<(instance: ObservedInstance) => void>();
  private readonly qmps = new Map<string, QmpClient>();
  private readonly locks = new Map<string, Promise<unknown>>();
  /** Ids with an operation queued or running (count), which get() must not wait behind. */
  private readonly operating = new Map<string, number>();
  private readonly poller: NodeJS.Timeout;
  private polling = false;
  private readonly qemuImg: string;
  /** How the last fork from Standby cloned guest memory (for reports and tests): mapped from a
   * frozen base, or (RAM inside the snapshot stream) copied or reflinked. */
  lastCopyPath: CopyPath | "frozen-base" | undefined;
  /** How the last fork cloned the disk: a reflink (where the data dir can) or qcow2 overlays
   * on a frozen base. */
  lastDiskClone: "reflink" | "overlay" | undefined;
  private reflinks: Promise<boolean> | undefined;
  /** How long the last restore took to apply the guest's identity (for reports and tests). */
  lastIdentityMs: number | undefined;

  constructor(
    agentPaths: AgentPaths,
    private readonly options: QemuDriverOptions,
  ) {
    this.paths = agentPaths.qemu;
    this.store = new QemuStore(this.paths);
    this.qemuImg = options.qemuImg ?? "/usr/bin/qemu-img";
    this.poller = setInterval(() => void this.poll(), options.pollMs ?? 500);
    this.poller.unref();
  }

  capabilities(): DriverCapabilities {
    return {
      hypervisors: ["qemu"],
      fork_from_stopped: true,
      fork_from_standby: true,
      // The control plane puts a Running source in standby, forks, and restores it.
      fork_from_running: false,
      standby: true,
      // microvm has no memory hotplug.
      hotplug_memory: false,
      disk_io_limit: true,
      volumes: false,
      images: true,
      min_memory_bytes: MIN_GUEST_MEMORY,
    };
  }

  async images(): Promise<ImageInfo[]> {
    return (await this.options.images.list()).map(({ rootfs: _, ...info }) => info);
  }

  async inventory(): Promise<ObservedInstance[]> {
    const found = await Promise.all((await this.store.ids()).map((id) => this.get(id)));
    return found.filter((i): i is ObservedInstance => i !== null);
  }

  async get(id: string): Promise<ObservedInstance | null> {
    const read = await this.store.read(id);
    if (read.kind === "missing") return null;
    if (read.kind === "corrupt") {
      return {
        id,
        state: "Unknown",
        has_snapshot: false,
        state_error: `state file unreadable: ${read.error}`,
      };
    }
    // An operation in progress owns the record; otherwise check it against the process.
    if (this.operating.has(id)) return read.record.observed;
    return this.observing(id, async () => {
      const fresh = await this.store.read(id);
      if (fresh.kind !== "ok") return read.record.observed;
      return (await this.reconcile(fresh.record)).observed;
    });
  }

  async create(spec: InstanceSpec, ctx: OpContext): Promise<ObservedInstance> {
    const id = spec.id;
    return this.locked(id, async () => {
      const machine = machineFor(spec);
      const image = await this.options.images.get(spec.image);
      guestConfig(spec, image); // refuses a spec with nothing to run before anything is made
      let rec: QemuRecord = {
        created_by: ctx.commandId,
        spec,
        image,
        machine,
        observed: { id, state: "Initializing", has_snapshot: false, state_error: null },
        pid: null,
        serial_offset: 0,
        ram: "file",
        ram_base: null,
        guest_identity: null,
      };
      await runSteps(ctx.steps, [
        {
          name: "create-disk",
          run: async () => {
            await this.makeInstanceDir(id);
            await createInstanceDisk(
              this.tools(),
              this.paths,
              this.paths.diskFile(id),
              spec.overlay_bytes,
            );
          },
          undo: () => this.discard(id),
        },
        { name: "register", run: () => this.store.write(rec) },
        {
          name: "boot",
          run: async () => {
            rec = await this.boot(rec);
          },
        },
      ]);
      return rec.observed;
    });
  }

  async start(op: OpData<"start">, ctx: OpContext): Promise<ObservedInstance> {
    const id = op.instance_id;
    return this.locked(id, async () => {
      const before = await this.load(id);
      if (before.observed.state !== "Stopped") {
        throw new InvalidStateError(
          `cannot start instance ${id} in state ${before.observed.state}`,
        );
      }
      const spec = {
        ...before.spec,
        entrypoint: op.entrypoint ?? before.spec.entrypoint,
        cmd: op.cmd ?? before.spec.cmd,
      };
      guestConfig(spec, before.image);
      let rec: QemuRecord = { ...before, spec };
      await runSteps(ctx.steps, [
        {
          name: "boot",
          run: async () => {
            rec = await this.boot(rec);
          },
        },
      ]);
      return rec.observed;
    });
  }

  async stop(id: string, ctx: OpContext): Promise<ObservedInstance> {
    return this.locked(id, async () => {
      const rec = await this.load(id);
      let out = stopped(rec, { code: null, message: null });
      await runSteps(ctx.steps, [
        {
          name: "shutdown",
          run: async () => {
            if (rec.pid !== null) await this.shutdown(id, rec.pid);
            // The program's own end, when it came before the power-off (SIGTERM: 143).
            const exit = exitEvent(await this.serialSince(id, rec.serial_offset));
            if (exit)
              out = stopped(rec, { code: exit.code, message: exitMessage(exit.code, exit.oom) });
            await this.dropMemory(id);
            await this.store.write(out);
            if (rec.ram_base !== null) await this.gcMemory();
          },
        },
      ]);
      return out.observed;
    });
  }

  async standby(id: string, ctx: OpContext): Promise<ObservedInstance> {
    return this.locked(id, async () => {
      const rec = await this.load(id);
      if (rec.observed.state !== "Running" || rec.pid === null) {
        throw new InvalidStateError(`cannot standby instance ${id} in state ${rec.observed.state}`);
      }
      const out = await this.snapshot(rec, ctx.steps.record.bind(ctx.steps));
      return out.observed;
    });
  }

  async restore(id: string, ctx: OpContext): Promise<ObservedInstance> {
    return this.locked(id, async () => {
      const rec = await this.load(id);
      if (rec.observed.state !== "Standby" || !(await this.hasSnapshot(rec))) {
        throw new InvalidStateError(`instance ${id} has no snapshot to restore`);
      }
      let out = rec;
      await runSteps(ctx.steps, [
        {
          name: "restore",
          run: async () => {
            out = await this.resume(rec);
          },
        },
      ]);
      return out.observed;
    });
  }

  async delete(id: string, ctx: OpContext): Promise<void> {
    await this.locked(id, async () => {
      await this.discard(id);
      await this.gc();
      await ctx.steps.record("delete");
    });
  }

  async fork(op: OpData<"fork">, ctx: OpContext): Promise<[ObservedInstance, ObservedInstance]> {
    const { source_id, target, target_state } = op;
    return this.locked(source_id, () =>
      this.locked(target.id, async () => {
        const source = await this.load(source_id);
        const from = source.observed.state;
        if (from !== "Stopped" && from !== "Standby") {
          throw new InvalidStateError(
            `cannot fork instance ${source_id} in state ${from}: the qemu driver forks Stopped or Standby sources`,
          );
        }
        const withMemory = from === "Standby" && target_state !== "Stopped";
        const tools = this.tools();
        const sourceDisk = this.paths.diskFile(source_id);
        let base = "";
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
        let rec: QemuRecord = {
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
        this.reflinks ??= canReflink(this.paths.instancesDir);
        const reflink = await this.reflinks;
        this.lastDiskClone = reflink ? "reflink" : "overlay";
        const steps: Step[] = [];
        if (!reflink) {
          steps.push({
            name: "freeze-disk",
            run: async () => {
              base = await freezeDisk(tools, this.paths, sourceDisk, source.spec.overlay_bytes);
            },
            undo: () => unfreezeDisk(sourceDisk, base),
          });
        }
        steps.push({
          name: "clone-disk",
          run: async () => {
            await this.makeInstanceDir(target.id);
            if (reflink) await reflinkDisk(sourceDisk, this.paths.diskFile(target.id));
            else {
              const bytes = Math.max(target.overlay_bytes, source.spec.overlay_bytes);
              await createOverlay(tools, this.paths.diskFile(target.id), base, bytes);
            }
            await this.writeConfig(rec);
          },
          undo: () => this.discard(target.id),
        });
        if (withMemory && source.ram !== "stream") {
          steps.push({
            name: "freeze-memory",
            run: async () => {
              const base = await this.freezeMemory(source);
              rec = { ...rec, ram: "base", ram_base: base };
            },
            undo: () => this.unfreezeMemory(source),
          });
        }
        if (withMemory) {
          steps.push({
            name: "clone-memory",
            run: async () => {
              // Device state only (~60 KB), unless the snapshot carries the RAM in its stream.
              const from = this.paths.devStateFile(source_id);
              const to = this.paths.devStateFile(target.id);
              if (source.ram === "stream") this.lastCopyPath = await copyMemory(from, to);
              else {
                await copyFile(from, to);
                this.lastCopyPath = "frozen-base";
              }
            },
          });
        }
        steps.push({ name: "register", run: () => this.store.write(rec) });
        if (target_state === "Running") {
          steps.push({
            name: withMemory ? "restore" : "boot",
            run: async () => {
              rec = withMemory ? await this.resume(rec) : await this.boot(rec);
            },
          });
        }
        if (target_state === "Standby" && !withMemory) {
          // A Stopped source has no memory to clone: boot the fork, then snapshot it.
          steps.push({
            name: "boot",
            run: async () => {
              rec = await this.boot(rec);
            },
            undo: async () => {
              if (rec.pid !== null) await this.kill(target.id, rec.pid);
            },
          });
          steps.push({
            name: "snapshot",
            run: async () => {
              rec = await this.snapshot(rec, async () => {});
            },
          });
        }
        await runSteps(ctx.steps, steps);
        return [(await this.load(source_id)).observed, rec.observed];
      }),
    );
  }

  rollback(
    op: Operation,
    ctx: { commandId: string; steps: readonly string[] },
  ): Promise<ObservedInstance[]> {
    return rollbackOperation(op, ctx.commandId, {
      get: (id) => this.get(id),
      ownedBy: (id, commandId) => this.store.ownedBy(id, commandId),
      discard: (id) => this.discard(id),
      remove: async (id) => {
        await this.discard(id);
        await this.gc();
      },
      converge: (id) => this.converge(id),
    });
  }

  logFile(id: string, source: "app" | "vmm"): string | undefined {
    return source === "app" ? this.paths.serialLog(id) : this.paths.qemuLog(id);
  }

  onEvent(listener: (instance: ObservedInstance) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  async close(): Promise<void> {
    clearInterval(this.poller);
    this.listeners.clear();
    const clients = [...this.qmps.values()];
    this.qmps.clear();
    await Promise.all(clients.map((c) => c.close()));
  }

  // ---- lifecycle pieces (no locks, no step journal: the public verbs add those) -------------

  /** Cold boot with a fresh RAM file; resolves once /init's ready marker is on the serial. */
  private async boot(rec: QemuRecord): Promise<QemuRecord> {
    const id = rec.observed.id;
    await this.dropMemory(id);
    await this.writeConfig(rec);
    const hadBase = rec.ram_base !== null;
    rec = { ...rec, ram: "file", ram_base: null };
    const offset = await sizeOf(this.paths.serialLog(id));
    const vm = await launchQemu(this.guestSpec(rec));
    this.qmps.set(id, vm.qmp);
    await writeFile(this.paths.pidFile(id), `${vm.pid}\n`);
    // The pid goes on record before the wait, so a crash mid-boot can still find the process.
    await this.store.write({ ...rec, pid: vm.pid, serial_offset: offset });
    try {
      await this.waitForSerial(id, offset, vm.pid, (log) => {
        const events = initEvents(log);
        const failed = events.find(
          (e): e is Extract<InitEvent, { event: "failed" }> => e.event === "failed",
        );
        if (failed) throw new ApiError("internal_error", `guest init failed: ${failed.message}`);
        return events.some((e) => e.event === "ready");
      });
    } catch (e) {
      await this.kill(id, vm.pid);
      await this.dropMemory(id);
      await this.store.write(rec);
      throw e;
    }
    const out: QemuRecord = {
      ...rec,
      pid: vm.pid,
      serial_offset: offset,
      // /init set the hostname from the config disk; the NIC came up with the machine's MAC.
      guest_identity: identityOf(rec),
      observed: running(id, now()),
    };
    if (hadBase) await this.gcMemory();
    await this.store.write(out);
    return out;
  }

  /** Running → Standby: pause, write the device state (RAM stays in its file), quit. */
  private async snapshot(
    rec: QemuRecord,
    record: (step: string) => Promise<void>,
  ): Promise<QemuRecord> {
    const id = rec.observed.id;
    const pid = rec.pid;
    if (pid === null) throw new InvalidStateError(`instance ${id} has no QEMU process`);
    const qmp = await this.qmp(id);
    const devState = this.paths.devStateFile(id);
    const partial = `${devState}.partial`;
    await runSteps({ record }, [
      {
        name: "pause",
        run: async () => {
          await qmp.execute("stop");
        },
        undo: async () => {
          await qmp.execute("cont");
        },
      },
      {
        name: "save-state",
        run: async () => {
          // Shared RAM is already in its file: only device state goes into the stream. RAM mapped
          // privately over a memory base exists nowhere else, so it goes into the stream too.
          await qmp.execute("migrate-set-capabilities", {
            capabilities: [{ capability: "x-ignore-shared", state: rec.ram !== "base" }],
          });
          await qmp.execute("migrate-set-parameters", { "max-bandwidth": MAX_BANDWIDTH });
          await qmp.execute("migrate", { uri: `exec:cat > ${shellQuote(partial)}` });
          await this.waitMigration(qmp, "completed");
          await rename(partial, devState);
        },
        undo: () => rm(devState, { force: true }),
      },
    ]);
    // Past this point the snapshot is complete; quitting cannot be undone, only finished.
    await this.quit(id, pid);
    const out: QemuRecord = {
      ...rec,
      pid: null,
      ram: rec.ram === "base" ? "stream" : rec.ram,
      ram_base: null,
      observed: { ...rec.observed, state: "Standby", has_snapshot: true },
    };
    await this.store.write(out);
    if (rec.ram_base !== null) await this.gcMemory();
    await record("release-vmm");
    return out;
  }

  /** Standby → Running: map the same RAM file, load the device state, continue. The guest
   * resumes where it was paused; the snapshot is consumed (has_snapshot false once Running). */
  private async resume(rec: QemuRecord): Promise<QemuRecord> {
    const id = rec.observed.id;
    const devState = this.paths.devStateFile(id);
    const memFile = this.paths.memFile(id);
    // The record as it will be once this QEMU runs: a forked source gets a writable copy of its
    // frozen RAM, RAM in the stream loads into a fresh file; either way the guest owns a file.
    const live = afterRestore(rec);
    if (rec.ram === "stream") await rm(memFile, { force: true });
    if (rec.ram === "frozen" && rec.ram_base !== null) {
      this.lastCopyPath = await copyMemory(rec.ram_base, memFile);
    }
    const vm = await launchQemu(
      // -S: nothing runs before `cont`, so a failed restore leaves the RAM file untouched.
      this.guestSpec(live, ["-S", "-incoming", "defer"]),
    ).catch(async (e: unknown) => {
      if (rec.ram === "frozen") await rm(memFile, { force: true });
      throw e;
    });
    this.qmps.set(id, vm.qmp);
    await writeFile(this.paths.pidFile(id), `${vm.pid}\n`);
    try {
      await vm.qmp.execute("migrate-set-capabilities", {
        capabilities: [{ capability: "x-ignore-shared", state: rec.ram !== "stream" }],
      });
      await vm.qmp.execute("migrate-incoming", { uri: `exec:cat ${shellQuote(devState)}` });
      await this.waitStatus(vm.qmp, "paused");
      await vm.qmp.execute("cont");
    } catch (e) {
      await this.kill(id, vm.pid);
      throw e;
    }
    // The restored guest still has the identity it was snapshotted with (the device state and
    // its kernel's memory carry the MAC; QEMU's command line does not change them): apply the
    // record's inside the guest before reporting Running. A fork must never run as its source.
    let identity: string;
    try {
      identity = await this.applyIdentity(rec);
    } catch (e) {
      // The guest has run since `cont`, so its RAM file no longer matches the old device state:
      // snapshot it again to get back to a consistent Standby (a fork's undo then discards it).
      await this.resnapshot({ ...live, pid: vm.pid }).catch(async () => {
        await this.kill(id, vm.pid);
        await this.dropMemory(id);
        await this.store.write(
          stopped(rec, {
            code: rec.observed.exit_code ?? null,
            message: "guest identity not applied after restore",
          }),
        );
      });
      throw new ApiError(
        "internal_error",
        `instance ${id}: restored guest did not apply its identity: ${(e as Error).message}`,
      );
    }
    await rm(devState, { force: true });
    const out: QemuRecord = {
      ...live,
      pid: vm.pid,
      guest_identity: identity,
      observed: running(id, rec.observed.started_at ?? now()),
    };
    await this.store.write(out);
    if (rec.ram === "frozen") await this.gcMemory();
    return out;
  }

  /** Tells the guest its identity over the control channel (hostname and the NIC's MAC), unless
   * its memory already holds exactly that one (a plain restore). Returns the identity. */
  private async applyIdentity(rec: QemuRecord): Promise<string> {
    const want = identityOf(rec);
    if (rec.guest_identity === want) {
      this.lastIdentityMs = 0;
      return want;
    }
    const started = Date.now();
    await setGuestIdentity(
      this.paths.ctlSocket(rec.observed.id),
      guestHostname(rec.spec.name),
      rec.machine.mac,
      { timeoutMs: this.options.controlTimeoutMs ?? CONTROL_TIMEOUT_MS },
    );
    this.lastIdentityMs = Date.now() - started;
    return want;
  }

  private async writeConfig(rec: QemuRecord): Promise<void> {
    const file = this.paths.configFile(rec.observed.id);
    await writeFile(`${file}.tmp`, guestConfig(rec.spec, rec.image));
    await rename(`${file}.tmp`, file);
  }

  /** Back to Standby after a restore that cannot go on (the guest has run since `cont`). */
  private async resnapshot(rec: QemuRecord): Promise<void> {
    await this.snapshot(
      { ...rec, observed: running(rec.observed.id, rec.observed.started_at ?? now()) },
      async () => {},
    );
  }

  private guestSpec(rec: QemuRecord, extra: readonly string[] = []): GuestSpec {
    const id = rec.observed.id;
    const m = rec.machine;
    const devices = guestDevices(
      { root: rec.image.rootfs, rw: this.paths.diskFile(id), cfg: this.paths.configFile(id) },
      m.mac,
      rec.spec.disk_io_bps,
    );
    return {
      qemu: this.options.assets.qemu,
      kernel: this.options.assets.kernelElf,
      initramfs: this.options.assets.initramfs,
      accel: this.options.accel,
      memoryMiB: m.memory_mib,
      vcpus: m.vcpus,
      memFile: rec.ram === "base" && rec.ram_base !== null ? rec.ram_base : this.paths.memFile(id),
      shareMemory: rec.ram !== "base",
      qmpSocket: this.paths.qmpSocket(id),
      ctlSocket: this.paths.ctlSocket(id),
      serialLog: this.paths.serialLog(id),
      qemuLog: this.paths.qemuLog(id),
      appendSerial: true,
      extraArgs: [...devices, ...extra],
    };
  }

  // ---- observing -----------------------------------------------------------------------------

  /** Checks a Running record against its process and serial log; records and emits an exit. */
  private async reconcile(rec: QemuRecord): Promise<QemuRecord> {
    if (rec.observed.state !== "Running") return rec;
    const id = rec.observed.id;
    if (rec.pid === null) {
      return {
        ...rec,
        observed: { ...rec.observed, state: "Unknown", state_error: "Running without a pid" },
      };
    }
    const alive = isOurQemu(rec.pid, this.paths.qmpSocket(id));
    const exit = exitEvent(await this.serialSince(id, rec.serial_offset));
    if (alive && exit === undefined) return rec;
    // The guest has exited (its init powers off after the marker) or QEMU died under it.
    if (alive) {
      await this.waitGone(id, rec.pid, QUIT_TIMEOUT_MS);
    }
    await this.closeQmp(id);
    await this.dropMemory(id);
    const out = stopped(rec, {
      code: exit?.code ?? null,
      message:
        exit === undefined
          ? `hypervisor exited unexpectedly: ${await this.qemuLogTail(id)}`
          : exitMessage(exit.code, exit.oom),
    });
    await this.store.write(out);
    for (const l of this.listeners) l(out.observed);
    return out;
  }

  private async poll(): Promise<void> {
    if (this.polling) return;
    this.polling = true;
    try {
      for (const id of await this.store.ids()) {
        if (this.operating.has(id)) continue;
        await this.observing(id, async () => {
          const read = await this.store.read(id);
          if (read.kind === "ok") await this.reconcile(read.record);
        });
      }
    } catch {
      // The next tick retries; an instance removed mid-poll is not an error.
    } finally {
      this.polling = false;
    }
  }

  private async serialSince(id: string, offset: number): Promise<string> {
    try {
      const buf = await readFile(this.paths.serialLog(id));
      return buf.subarray(offset).toString("utf8");
    } catch (e) {
      if (isMissing(e)) return "";
      throw e;
    }
  }

  private async qemuLogTail(id: string): Promise<string> {
    try {
      const text = (await readFile(this.paths.qemuLog(id), "utf8")).trim();
      return text.split("\n").slice(-3).join(" | ") || "(no output)";
    } catch {
      return "(no output)";
    }
  }

  private async waitForSerial(
    id: string,
    offset: number,
    pid: number,
    found: (log: string) => boolean,
  ): Promise<void> {
    const timeoutMs = this.options.bootTimeoutMs ?? 60_000;
    const deadline = Date.now() + timeoutMs;
    const sock = this.paths.qmpSocket(id);
    for (;;) {
      const log = await this.serialSince(id, offset);
      if (found(log)) return;
      if (!isOurQemu(pid, sock)) {
        const console = log.trim().split("\n").slice(-3).join(" | ");
        throw new ApiError(
          "boot_failed",
          `QEMU for ${id} exited during boot: ${await this.qemuLogTail(id)}${console ? `; the guest's console ended with: ${console}` : ""}`,
        );
      }
      if (Date.now() >= deadline) {
        const tail = log.trim().split("\n").slice(-3).join(" | ");
        throw new ApiError("timeout", `instance ${id} not ready within ${timeoutMs} ms: ${tail}`);
      }
      await sleep(100);
    }
  }

  private async waitMigration(qmp: QmpClient, want: "completed"): Promise<void> {
    const deadline = Date.now() + MIGRATE_TIMEOUT_MS;
    for (;;) {
      const info = await qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate");
      if (info.status === want) return;
      if (info.status === "failed" || info.status === "cancelled") {
        throw new Error(`migration ${info.status}: ${info["error-desc"] ?? "no detail"}`);
      }
      if (Date.now() >= deadline) throw new Error(`migration not ${want} (${info.status})`);
      await sleep(10);
    }
  }

  private async waitStatus(qmp: QmpClient, want: string): Promise<void> {
    const deadline = Date.now() + MIGRATE_TIMEOUT_MS;
    for (;;) {
      const s = await qmp.execute<{ status: string }>("query-status");
      if (s.status === want) return;
      const m = await qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate");
      if (m.status === "failed") {
        throw new Error(`incoming migration failed: ${m["error-desc"] ?? "no detail"}`);
      }
      if (Date.now() >= deadline) throw new Error(`guest not ${want} (status ${s.status})`);
      await sleep(10);
    }
  }

  // ---- processes and files -------------------------------------------------------------------

  private async qmp(id: string): Promise<QmpClient> {
    const open = this.qmps.get(id);
    if (open && !open.isClosed) return open;
    const client = await QmpClient.connect(this.paths.qmpSocket(id), { timeoutMs: 5_000 });
    this.qmps.set(id, client);
    return client;
  }

  private async closeQmp(id: string): Promise<void> {
    const c = this.qmps.get(id);
    this.qmps.delete(id);
    await c?.close();
  }

  /** Graceful first: the guest's init SIGTERMs the program and powers off when it has exited.
   * A guest that cannot be asked, or is not gone within stopTimeoutMs, is quit. */
  private async shutdown(id: string, pid: number): Promise<void> {
    const sock = this.paths.qmpSocket(id);
    const asked = await askGuestToStop(this.paths.ctlSocket(id), { timeoutMs: 2_000 }).catch(
      () => false,
    );
    if (asked) {
      const deadline = Date.now() + (this.options.stopTimeoutMs ?? STOP_TIMEOUT_MS);
      while (isOurQemu(pid, sock) && Date.now() < deadline) await sleep(50);
    }
    await this.quit(id, pid);
  }

  /** `quit` over QMP (a busybox init ignores ACPI powerdown), SIGKILL after a bound. */
  private async quit(id: string, pid: number): Promise<void> {
    const sock = this.paths.qmpSocket(id);
    if (isOurQemu(pid, sock)) {
      try {
        const qmp = await this.qmp(id);
        await qmp.execute("quit").catch((e: unknown) => {
          // QEMU may close the connection before answering; it is quitting either way.
          if (!(e instanceof Error && e.name === "QmpClosedError")) throw e;
        });
      } catch {
        // No QMP: fall through to the bounded wait and SIGKILL.
      }
    }
    await this.waitGone(id, pid, QUIT_TIMEOUT_MS);
    await this.closeQmp(id);
  }

  private async kill(id: string, pid: number): Promise<void> {
    await this.waitGone(id, pid, 0);
    await this.closeQmp(id);
  }

  /** Waits up to `ms` for the process to end, then SIGKILLs it and waits for that. */
  private async waitGone(id: string, pid: number, ms: number): Promise<void> {
    const sock = this.paths.qmpSocket(id);
    const deadline = Date.now() + ms;
    while (isOurQemu(pid, sock) && Date.now() < deadline) await sleep(50);
    if (!isOurQemu(pid, sock)) return;
    killProcess(pid);
    const hard = Date.now() + 5_000;
    while (isOurQemu(pid, sock)) {
      if (Date.now() >= hard) throw new Error(`QEMU pid ${pid} survived SIGKILL`);
      await sleep(20);
    }
  }

  private async dropMemory(id: string): Promise<void> {
    await rm(this.paths.memFile(id), { force: true });
    await rm(this.paths.devStateFile(id), { force: true });
  }

  /** Kills the instance's QEMU (found by record or pid file) and removes its files. */
  private async discard(id: string): Promise<void> {
    const pids = new Set<number>();
    const read = await this.store.read(id);
    if (read.kind === "ok" && read.record.pid !== null) pids.add(read.record.pid);
    try {
      const n = Number.parseInt(await readFile(this.paths.pidFile(id), "utf8"), 10);
      if (Number.isInteger(n) && n > 0) pids.add(n);
    } catch (e) {
      if (!isMissing(e)) throw e;
    }
    for (const pid of qemuPidsFor(this.paths.qmpSocket(id))) pids.add(pid);
    for (const pid of pids) await this.kill(id, pid);
    await this.closeQmp(id);
    await this.store.remove(id);
  }

  /** After a crash mid-operation: make the record say what the process and files show. */
  private async converge(id: string): Promise<void> {
    const read = await this.store.read(id);
    if (read.kind !== "ok") return;
    const rec = read.record;
    let pid = rec.pid;
    if (pid === null) {
      try {
        pid = Number.parseInt(await readFile(this.paths.pidFile(id), "utf8"), 10);
      } catch (e) {
        if (!isMissing(e)) throw e;
      }
    }
    const sock = this.paths.qmpSocket(id);
    // A guest launched by an agent killed before it recorded the pid: found by its socket.
    if (pid === null || !isOurQemu(pid, sock)) pid = qemuPidsFor(sock)[0] ?? null;
    if (pid !== null) {
      const qmp = await this.qmp(id);
      const { status } = await qmp.execute<{ status: string }>("query-status");
      if (status === "inmigrate") {
        // An interrupted restore that never loaded its device state: the guest has not run, so
        // the snapshot on disk is intact. Kept, this QEMU would be a Running guest that never runs.
        await this.kill(id, pid);
      } else {
        // An interrupted standby paused it, or an interrupted restore had not continued it yet.
        if (status === "paused" || status === "postmigrate") await qmp.execute("cont");
        await rm(this.paths.devStateFile(id), { force: true });
        // After a restore the guest owns a RAM file (resume()'s `live`), whatever the snapshot was.
        const live: QemuRecord = {
          ...afterRestore(rec),
          pid,
          observed: running(id, rec.observed.started_at ?? now()),
        };
        try {
          // A fork's first restore cut short may not have told the guest who it is yet.
          await this.store.write({ ...live, guest_identity: await this.applyIdentity(live) });
        } catch (e) {
          await this.kill(id, pid);
          await this.dropMemory(id);
          await this.store.write(
            stopped(live, {
              code: null,
              message: `guest identity not applied after an interrupted restore: ${(e as Error).message}`,
            }),
          );
        }
        await this.gcMemory();
        return;
      }
    }
    // A freeze-memory step cut short after its record was written: finish moving the file.
    if (
      rec.ram === "frozen" &&
      rec.ram_base !== null &&
      !(await exists(rec.ram_base)) &&
      (await exists(this.paths.memFile(id)))
    ) {
      await mkdir(this.paths.memBasesDir, { recursive: true });
      await rename(this.paths.memFile(id), rec.ram_base);
    }
    const snapshot = await this.hasSnapshot(rec);
    if (snapshot && (rec.observed.state === "Running" || rec.observed.state === "Standby")) {
      await this.store.write({
        ...rec,
        pid: null,
        observed: { ...rec.observed, state: "Standby", has_snapshot: true },
      });
      return;
    }
    if (rec.observed.state === "Running" || rec.observed.state === "Standby") {
      await this.dropMemory(id);
      await this.store.write(
        stopped(rec, {
          code: rec.observed.exit_code ?? null,
          message: "hypervisor gone after an interrupted operation",
        }),
      );
    }
  }

  /** Whether the record's snapshot files are all there. */
  private async hasSnapshot(rec: QemuRecord): Promise<boolean> {
    if (!(await exists(this.paths.devStateFile(rec.observed.id)))) return false;
    if (rec.ram === "stream") return true;
    if (rec.ram === "base" || rec.ram === "frozen") {
      return rec.ram_base !== null && exists(rec.ram_base);
    }
    return exists(this.paths.memFile(rec.observed.id));
  }

  /**
   * Makes a Standby source's RAM file a read-only memory base and points the source at it.
   * The record is written first, so a crash before the rename is finished by converge().
   */
  private async freezeMemory(source: QemuRecord): Promise<string> {
    if ((source.ram === "base" || source.ram === "frozen") && source.ram_base !== null) {
      return source.ram_base;
    }
    const id = source.observed.id;
    const base = this.paths.memBaseFile(randomBytes(8).toString("hex"));
    await mkdir(this.paths.memBasesDir, { recursive: true });
    await this.store.write({ ...source, ram: "frozen", ram_base: base });
    await rename(this.paths.memFile(id), base);
    await chmod(base, 0o444);
    return base;
  }

  /** Undoes freezeMemory while no fork uses the base yet. */
  private async unfreezeMemory(source: QemuRecord): Promise<void> {
    const read = await this.store.read(source.observed.id);
    if (read.kind !== "ok" || source.ram !== "file") return;
    const base = read.record.ram_base;
    if (read.record.ram === "frozen" && base !== null && (await exists(base))) {
      await chmod(base, 0o644);
      await rename(base, this.paths.memFile(source.observed.id));
    }
    await this.store.write({ ...read.record, ram: "file", ram_base: null });
  }

  /** Removes disk and memory bases no instance refers to any more (after a delete: the only
   * thing that shortens disk chains; reading them costs a `qemu-img` per instance). */
  private async gc(): Promise<void> {
    await gcBases(this.tools(), this.paths);
    await this.gcMemory();
  }

  /** Removes memory bases no record refers to (a guest stopped, snapshotted or restored off
   * one; disk chains are untouched then). */
  private async gcMemory(): Promise<void> {
    await gcMemBases(this.paths, this.store);
  }

  private async makeInstanceDir(id: string): Promise<void> {
    await mkdir(this.paths.instancesDir, { recursive: true });
    try {
      await mkdir(this.paths.instanceDir(id));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "EEXIST") {
        throw new ApiError("conflict", `instance ${id} already exists on this host`);
      }
      throw e;
    }
    const sock = this.paths.qmpSocket(id);
    if (!sock.startsWith(this.paths.instanceDir(id))) {
      await mkdir(sock.slice(0, sock.lastIndexOf("/")), { recursive: true });
    }
  }

  private async load(id: string): Promise<QemuRecord> {
    const read = await this.store.read(id);
    if (read.kind === "ok") return read.record;
    if (read.kind === "missing") throw new NotFoundError(`instance ${id} not found on this host`);
    throw new InvalidStateError(`instance ${id} is Unknown: state file unreadable: ${read.error}`);
  }

  /** An operation: holds the instance's lock; get() meanwhile reports the record as is. */
  private async locked<T>(id: string, fn: () => Promise<T>): Promise<T> {
    this.operating.set(id, (this.operating.get(id) ?? 0) + 1);
    try {
      return await this.serialized(id, fn);
    } finally {
      const n = (this.operating.get(id) ?? 1) - 1;
      if (n === 0) this.operating.delete(id);
      else this.operating.set(id, n);
    }
  }

  /** Checking a record against its process (get, poll): serialized with operations. */
  private observing<T>(id: string, fn: () => Promise<T>): Promise<T> {
    return this.serialized(id, fn);
  }

  /** One operation or observation per instance at a time. */
  private async serialized<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(id) ?? Promise.resolve();
    const run = prev.catch(() => {}).then(fn);
    const tail = run.catch(() => {});
    this.locks.set(id, tail);
    try {
      return await run;
    } finally {
      if (this.locks.get(id) === tail) this.locks.delete(id);
    }
  }

  private tools() {
    return { qemuImg: this.qemuImg };
  }
}

/** The record once a restored guest runs: it owns a RAM file (a forked source's copy of its
 * frozen RAM, or the RAM loaded from the stream), unless it is a fork mapping its memory base. */
function afterRestore(rec: QemuRecord): QemuRecord {
  return rec.ram === "frozen" || rec.ram === "stream"
    ? { ...rec, ram: "file", ram_base: null }
    : rec;
}

/** The record of a guest whose QEMU is gone: Stopped, its memory dropped with it (so no memory
 * base is kept for it either). */
function stopped(
  rec: QemuRecord,
  exit: { code: number | null; message: string | null },
): QemuRecord {
  return {
    ...rec,
    pid: null,
    ram: "file",
    ram_base: null,
    observed: {
      ...rec.observed,
      state: "Stopped",
      has_snapshot: false,
      stopped_at: now(),
      exit_code: exit.code,
      exit_message: exit.message,
    },
  };
}

/** Hypeman's wording for a program's exit status. */
export function exitMessage(code: number, oom = false): string {
  if (code === 127) return "command not found";
  if (code > 128 && code < 128 + 65) {
    const sig = code - 128;
    const name = Object.entries(osConstants.signals).find(([, n]) => n === sig)?.[0];
    return `killed by signal ${sig}${name ? ` (${name})` : ""}${oom ? " - OOM" : ""}`;
  }
  return `exited with code ${code}`;
}

function exitEvent(log: string): { code: number; oom: boolean } | undefined {
  for (const e of initEvents(log)) {
    if (e.event === "exit") return { code: e.code, oom: e.oom === true };
  }
  return undefined;
}

async function sizeOf(file: string): Promise<number> {
  try {
    return (await stat(file)).size;
  } catch (e) {
    if (isMissing(e)) return 0;
    throw e;
  }
}
