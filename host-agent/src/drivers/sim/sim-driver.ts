// The simulated hypervisor: no VMs, just state files, timers and the same rules a real driver
// has to follow, so the control plane's tests exercise real outcomes (conflicts, invalid
// states, rollbacks, crash recovery) at fleet scale. Never evidence that VMs work.
// Its files are a line or two each, so it uses synchronous calls: a few microseconds in the
// kernel instead of a trip through libuv's thread pool per call, which was most of a zero-latency
// sim operation's time.
import {
  appendFileSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import {
  ApiError,
  ConflictError,
  type DriverCapabilities,
  type ErrorCode,
  type ImageInfo,
  type InstanceSpec,
  InvalidStateError,
  NotFoundError,
  type ObservedInstance,
  type Operation,
  type OperationKind,
  type SnapshotInfo,
  type VmmStats,
} from "@offshoot/shared";
import {
  COMPRESSED_EXT,
  compressFile,
  compressorsInstalled,
  decompressFile,
} from "../../compressors.ts";
import type { SimLatency } from "../../config.ts";
import type { Guest } from "../../guest/link.ts";
import { runSteps, type Step } from "../../operations/steps.ts";
import type { AgentPaths } from "../../paths.ts";
import type { Driver, DriverLogSource, OpContext, OpData } from "../driver.ts";
import { running } from "../observed.ts";
import { exists } from "../record-store.ts";
import { rollbackOperation } from "../rollback.ts";
import { SimGuest } from "./sim-guest.ts";
import { type SimRecord, SimStore } from "./store.ts";

export interface SimOptions {
  latencyMs: SimLatency;
  /** Fault injection: ops of these kinds fail with the code after doing and undoing their steps. */
  fail: Partial<Record<OperationKind, ErrorCode>>;
  execLog: boolean;
}

const CAPABILITIES: DriverCapabilities = {
  hypervisors: ["qemu", "cloud-hypervisor", "firecracker"],
  fork_from_stopped: true,
  fork_from_standby: true,
  standby: true,
  hotplug_memory: true,
  disk_io_limit: true,
  volumes: true,
  images: false,
  min_memory_bytes: 64 * 1024 * 1024,
  snapshot_compression: false,
};

const now = () => new Date().toISOString();

export class SimDriver implements Driver {
  readonly name = "sim";
  private readonly store: SimStore;
  /** Snapshots: records like instances', with a copy of the disk (and memory) files. */
  private readonly snaps: SimStore;
  private readonly listeners = new Set<(instance: ObservedInstance) => void>();
  private readonly compressors = compressorsInstalled();

  constructor(
    private readonly paths: AgentPaths,
    private readonly options: SimOptions,
  ) {
    this.store = new SimStore(paths.sim);
    this.snaps = new SimStore(paths.simSnapshots);
  }

  async images(): Promise<ImageInfo[]> {
    return [];
  }

  async rootfsInUse(): Promise<Set<string>> {
    return new Set();
  }

  async volumesInUse(): Promise<Set<string>> {
    return new Set();
  }

  capabilities(): DriverCapabilities {
    return { ...structuredClone(CAPABILITIES), snapshot_compression: this.compressors };
  }

  async inventory(): Promise<ObservedInstance[]> {
    const found = await Promise.all((await this.store.ids()).map((id) => this.get(id)));
    return found.filter((i): i is ObservedInstance => i !== null);
  }

  snapshotIds(): Promise<string[]> {
    return this.snaps.ids();
  }

  async get(id: string): Promise<ObservedInstance | null> {
    const read = await this.store.read(id);
    if (read.kind === "ok") return read.record.observed;
    if (read.kind === "missing") return null; // a half-made dir is not an instance
    return {
      id,
      state: "Unknown",
      has_snapshot: false,
      state_error: `state file unreadable: ${read.error}`,
    };
  }

  async create(spec: InstanceSpec, ctx: OpContext): Promise<ObservedInstance> {
    await this.executed(ctx, "create", spec.id);
    await this.run("create", ctx, [
      {
        name: "create-disk",
        run: () => this.makeInstanceDir(spec.id, (f) => writeFileSync(f, `image ${spec.image}\n`)),
      },
      {
        name: "register",
        run: () =>
          this.store.write({ created_by: ctx.commandId, spec, observed: running(spec.id) }),
      },
    ]);
    return this.require(spec.id);
  }

  async start(op: OpData<"start">, ctx: OpContext): Promise<ObservedInstance> {
    await this.executed(ctx, "start", op.instance_id);
    const rec = await this.load(op.instance_id);
    const spec = {
      ...rec.spec,
      entrypoint: op.entrypoint ?? rec.spec.entrypoint,
      cmd: op.cmd ?? rec.spec.cmd,
    };
    await this.run("start", ctx, [this.setState("boot", rec, running(op.instance_id), spec)]);
    return this.require(op.instance_id);
  }

  async stop(id: string, ctx: OpContext): Promise<ObservedInstance> {
    await this.executed(ctx, "stop", id);
    const rec = await this.load(id);
    await this.run("stop", ctx, [
      this.setState("shutdown", rec, {
        ...rec.observed,
        state: "Stopped",
        has_snapshot: false,
        stopped_at: now(),
        exit_code: null,
        exit_message: null,
      }),
    ]);
    return this.require(id);
  }

  async standby(id: string, ctx: OpContext): Promise<ObservedInstance> {
    await this.executed(ctx, "standby", id);
    const rec = await this.load(id);
    const snapshot = this.paths.sim.snapshotFile(id);
    await this.run("standby", ctx, [
      {
        name: "snapshot",
        run: async () => writeFileSync(snapshot, `memory of ${id} at ${now()}\n`),
        undo: async () => rmSync(snapshot, { force: true }),
      },
      this.setState("save-state", rec, { ...rec.observed, state: "Standby", has_snapshot: true }),
    ]);
    return this.require(id);
  }

  async restore(id: string, ctx: OpContext): Promise<ObservedInstance> {
    await this.executed(ctx, "restore", id);
    const rec = await this.load(id);
    const snapshot = this.paths.sim.snapshotFile(id);
    if (!(await exists(snapshot)))
      throw new InvalidStateError(`instance ${id} has no snapshot to restore`);
    await this.run("restore", ctx, [
      this.setState("restore", rec, {
        ...running(id),
        started_at: rec.observed.started_at ?? now(),
      }),
      // Restoring consumes the snapshot, as in Hypeman: has_snapshot is false once Running.
      {
        name: "discard-snapshot",
        run: async () => rmSync(snapshot, { force: true }),
        undo: async () => writeFileSync(snapshot, `memory of ${id}\n`),
      },
    ]);
    return this.require(id);
  }

  async delete(id: string, ctx: OpContext): Promise<void> {
    await this.executed(ctx, "delete", id);
    this.injectFault("delete"); // before, since a delete cannot be undone
    await this.latency("delete", 1);
    await this.store.remove(id);
    await ctx.steps.record("delete");
  }

  async fork(op: OpData<"fork">, ctx: OpContext): Promise<[ObservedInstance, ObservedInstance]> {
    const { source_id, target, target_state } = op;
    await this.executed(ctx, "fork", target.id, { source_id });
    const srcPaths = op.from_snapshot ? this.paths.simSnapshots : this.paths.sim;
    const source = await this.load(source_id, op.from_snapshot ? this.snaps : this.store);
    const from = source.observed.state;
    if (from !== "Stopped" && from !== "Standby") {
      throw new InvalidStateError(
        `cannot fork instance ${source_id} in state ${from}: the sim forks Stopped or Standby sources`,
      );
    }
    const withSnapshot = from === "Standby" && target_state !== "Stopped";
    if (withSnapshot && op.from_snapshot) await this.thawSnapshot(source_id);
    // The fork's state as last written (the sim holds the source still while it forks).
    let forked: ObservedInstance | undefined;
    const own = async (observed: ObservedInstance) => {
      await this.store.write({ created_by: ctx.commandId, spec: target, observed });
      forked = observed;
    };
    const steps: Step[] = [
      {
        name: "clone-disk",
        run: () =>
          this.makeInstanceDir(target.id, (f) => copyFileSync(srcPaths.diskFile(source_id), f)),
        undo: () => this.store.remove(target.id),
      },
    ];
    if (withSnapshot) {
      steps.push({
        name: "clone-snapshot",
        run: async () =>
          copyFileSync(srcPaths.snapshotFile(source_id), this.paths.sim.snapshotFile(target.id)),
      });
    }
    const registered: ObservedInstance = {
      id: target.id,
      state: withSnapshot ? "Standby" : "Stopped",
      has_snapshot: withSnapshot,
      state_error: null,
      exit_code: null,
      exit_message: null,
      started_at: null,
      stopped_at: withSnapshot ? null : now(),
    };
    steps.push({ name: "register", run: () => own(registered) });
    if (target_state === "Running") {
      // From Standby: restore the cloned snapshot (consuming it). From Stopped: cold boot.
      steps.push({
        name: withSnapshot ? "restore" : "boot",
        run: async () => {
          rmSync(this.paths.sim.snapshotFile(target.id), { force: true });
          await own(running(target.id));
        },
      });
    }
    if (target_state === "Standby" && !withSnapshot) {
      // A Stopped source has no memory to clone: boot the fork, then snapshot it, as Hypeman's
      // applyForkTargetState does (start, then standby).
      steps.push(
        { name: "boot", run: () => own(running(target.id)) },
        {
          name: "snapshot",
          run: async () => {
            writeFileSync(this.paths.sim.snapshotFile(target.id), `memory of ${target.id}\n`);
            if (!forked) throw new Error(`fork ${target.id} was not booted before its snapshot`);
            await own({ ...forked, state: "Standby", has_snapshot: true });
          },
        },
      );
    }
    await this.run("fork", ctx, steps);
    if (!forked) throw new Error(`fork ${target.id} left no record`);
    return [source.observed, forked];
  }

  async snapshotCreate(
    op: OpData<"snapshot_create">,
    ctx: OpContext,
  ): Promise<{ instance: ObservedInstance; snapshot: SnapshotInfo }> {
    const { instance_id, snapshot_id: id, snapshot_kind } = op;
    await this.executed(ctx, "snapshot_create", instance_id, { snapshot_id: id });
    const rec = await this.load(instance_id);
    const to = this.paths.simSnapshots;
    const files = [this.paths.sim.diskFile(instance_id)];
    if (snapshot_kind === "Standby") files.push(this.paths.sim.snapshotFile(instance_id));
    await this.run("snapshot_create", ctx, [
      {
        name: "clone",
        run: async () => {
          mkdirSync(to.instancesDir, { recursive: true });
          mkdirSync(to.instanceDir(id));
          copyFileSync(files[0] ?? "", to.diskFile(id));
          if (files[1]) copyFileSync(files[1], to.snapshotFile(id));
        },
        undo: () => this.snaps.remove(id),
      },
      {
        name: "register",
        run: () =>
          this.snaps.write({
            created_by: ctx.commandId,
            spec: { ...rec.spec, id },
            observed: { ...rec.observed, id },
          }),
      },
    ]);
    const size_bytes = files.reduce((n, f) => n + statSync(f).size, 0);
    return { instance: rec.observed, snapshot: { id, size_bytes } };
  }

  async snapshotRestore(op: OpData<"snapshot_restore">, ctx: OpContext): Promise<ObservedInstance> {
    const { instance_id: id, snapshot_id, target_state } = op;
    await this.executed(ctx, "snapshot_restore", id, { snapshot_id });
    const rec = await this.load(id);
    const snap = await this.load(snapshot_id, this.snaps);
    const from = this.paths.simSnapshots;
    const withMemory = snap.observed.state === "Standby";
    if (withMemory) await this.thawSnapshot(snapshot_id);
    const memory = this.paths.sim.snapshotFile(id);
    const observed: ObservedInstance =
      target_state === "Running"
        ? { ...running(id), started_at: now() }
        : target_state === "Standby"
          ? { ...rec.observed, state: "Standby", has_snapshot: true }
          : { ...rec.observed, state: "Stopped", has_snapshot: false, stopped_at: now() };
    await this.run("snapshot_restore", ctx, [
      {
        name: "replace-files",
        run: async () => {
          copyFileSync(from.diskFile(snapshot_id), this.paths.sim.diskFile(id));
          rmSync(memory, { force: true });
          if (withMemory) copyFileSync(from.snapshotFile(snapshot_id), memory);
          if (target_state === "Standby" && !withMemory) writeFileSync(memory, `memory of ${id}\n`);
          if (target_state !== "Standby") rmSync(memory, { force: true });
        },
      },
      this.setState("register", rec, { ...observed, exit_code: null, exit_message: null }),
    ]);
    return this.require(id);
  }

  async snapshotDelete(id: string): Promise<void> {
    await this.snaps.remove(id);
  }

  /** The sim's snapshot memory (a small file) is compressed by the same programs as a real
   * host's; a fork or restore decompresses it again (thawSnapshot) and keeps that copy. */
  async snapshotCompress(op: OpData<"snapshot_compress">): Promise<SnapshotInfo> {
    const { snapshot_id: id, algorithm, level } = op;
    const snap = await this.load(id, this.snaps);
    const to = this.paths.simSnapshots;
    const memory = to.snapshotFile(id);
    const packed = `${memory}.${COMPRESSED_EXT[algorithm]}`;
    if (snap.observed.state !== "Standby") {
      throw new InvalidStateError(`snapshot ${id} holds no memory to compress`);
    }
    if (!existsSync(packed)) {
      const uncompressed = statSync(memory).size;
      await compressFile(algorithm, level, memory, packed);
      writeFileSync(`${packed}.size`, String(uncompressed));
      rmSync(memory);
    }
    const compressed = statSync(packed).size;
    return {
      id,
      size_bytes: statSync(to.diskFile(id)).size + compressed,
      compressed_size_bytes: compressed,
      uncompressed_size_bytes: Number(readFileSync(`${packed}.size`, "utf8")),
    };
  }

  /** A compressed sim snapshot's memory file, decompressed again if it is not there. */
  private async thawSnapshot(id: string): Promise<void> {
    const memory = this.paths.simSnapshots.snapshotFile(id);
    if (existsSync(memory)) return;
    for (const algorithm of ["zstd", "lz4"] as const) {
      const packed = `${memory}.${COMPRESSED_EXT[algorithm]}`;
      if (existsSync(packed)) await decompressFile(algorithm, packed, memory);
    }
  }

  rollback(op: Operation, ctx: { commandId: string; steps: readonly string[] }) {
    return rollbackOperation(op, ctx.commandId, {
      get: (id) => this.get(id),
      ownedBy: (id, commandId) => this.store.ownedBy(id, commandId),
      discard: (id) => this.store.remove(id),
      remove: (id) => this.store.remove(id),
      converge: (id) => this.converge(id),
      discardSnapshot: async (id, commandId) => {
        if (await this.snaps.ownedBy(id, commandId)) await this.snaps.remove(id);
      },
      // The sim's restore replaces files in place: what is there stands.
      settleRestore: async () => {},
    });
  }

  async guest(id: string): Promise<Guest> {
    const rec = await this.load(id);
    if (rec.observed.state !== "Running")
      throw new InvalidStateError(`instance ${id} is ${rec.observed.state}, not Running`);
    if (rec.spec.skip_guest_agent)
      throw new ConflictError(`instance ${rec.spec.name} was created with skip_guest_agent`);
    return new SimGuest(rec.spec.name);
  }

  /** Made-up figures from the spec: the sim has no VMM process. */
  async stats(id: string): Promise<VmmStats> {
    const rec = await this.load(id);
    if (rec.observed.state !== "Running")
      throw new InvalidStateError(`instance ${id} is ${rec.observed.state}, not Running`);
    return {
      cpu_seconds: 0,
      memory_rss_bytes: rec.spec.memory_bytes,
      memory_vms_bytes: rec.spec.memory_bytes,
      network_rx_bytes: 0,
      network_tx_bytes: 0,
    };
  }

  /** The sim has a console (its state changes) but no VMM process with output of its own. */
  logFile(id: string, source: DriverLogSource): string | undefined {
    return source === "app" ? this.paths.sim.consoleLog(id) : undefined;
  }

  onEvent(listener: (instance: ObservedInstance) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  async close(): Promise<void> {
    this.listeners.clear();
  }

  /** Test hook: the guest exits on its own, as a real VM's program would. */
  async simulateExit(id: string, exitCode: number, message: string): Promise<ObservedInstance> {
    const rec = await this.load(id);
    const observed: ObservedInstance = {
      ...rec.observed,
      state: "Stopped",
      has_snapshot: false,
      exit_code: exitCode,
      exit_message: message,
      stopped_at: now(),
    };
    await this.store.write({ ...rec, observed });
    for (const listener of this.listeners) listener(observed);
    return observed;
  }

  // ---- helpers -----------------------------------------------------------------------------

  /** Runs the op's steps with its latency spread across them, then any injected fault. */
  private async run(kind: OperationKind, ctx: OpContext, steps: Step[]): Promise<void> {
    const delayed = steps.map(
      (s): Step => ({ ...s, run: () => this.latency(kind, steps.length).then(() => s.run()) }),
    );
    const code = this.options.fail[kind];
    if (code) delayed.push({ name: "fault", run: async () => this.injectFault(kind) });
    await runSteps(ctx.steps, delayed);
  }

  private injectFault(kind: OperationKind): void {
    const code = this.options.fail[kind];
    if (code) throw new ApiError(code, `simulated ${kind} failure (SIM_FAIL)`);
  }

  private async latency(kind: OperationKind, parts: number): Promise<void> {
    const l = this.options.latencyMs;
    const ms = typeof l === "number" ? l : (l[kind] ?? 0);
    if (ms > 0) await sleep(ms / parts);
  }

  /** One line per executed op: the evidence tests use that no command ran twice. */
  private async executed(ctx: OpContext, kind: OperationKind, instanceId: string, extra = {}) {
    if (!this.options.execLog) return;
    const line = { command_id: ctx.commandId, kind, instance_id: instanceId, ...extra };
    appendFileSync(this.paths.sim.execLog, `${JSON.stringify(line)}\n`);
  }

  /** Non-recursive mkdir is the atomic "id is free" check; `disk` then fills the disk file. */
  private async makeInstanceDir(id: string, disk: (file: string) => void): Promise<void> {
    const dir = this.paths.sim.instanceDir(id);
    try {
      try {
        mkdirSync(dir);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
        mkdirSync(this.paths.sim.instancesDir, { recursive: true });
        mkdirSync(dir);
      }
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "EEXIST") {
        throw new ApiError("conflict", `instance ${id} already exists on this host`);
      }
      throw e;
    }
    try {
      disk(this.paths.sim.diskFile(id));
    } catch (e) {
      await this.store.remove(id);
      throw e;
    }
  }

  private setState(
    name: string,
    rec: SimRecord,
    observed: ObservedInstance,
    spec = rec.spec,
  ): Step {
    return {
      name,
      run: () => this.store.write({ ...rec, spec, observed }),
      undo: () => this.store.write(rec),
    };
  }

  private async load(id: string, store = this.store): Promise<SimRecord> {
    const what = store === this.snaps ? "snapshot" : "instance";
    const read = await store.read(id);
    if (read.kind === "ok") return read.record;
    if (read.kind === "missing") throw new NotFoundError(`${what} ${id} not found on this host`);
    throw new InvalidStateError(`${what} ${id} is Unknown: state file unreadable: ${read.error}`);
  }

  private async require(id: string): Promise<ObservedInstance> {
    return (await this.load(id)).observed;
  }

  /** A snapshot file belongs to Standby only; one left by an interrupted standby/restore goes. */
  private async converge(id: string): Promise<void> {
    const read = await this.store.read(id);
    if (read.kind === "ok" && read.record.observed.state !== "Standby") {
      rmSync(this.paths.sim.snapshotFile(id), { force: true });
    }
  }
}
