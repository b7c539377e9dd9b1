// The one interface every hypervisor driver implements (qemu for real guests, sim for tests and benchmarks). Methods take the
// operation's data as the protocol defines it and return what the host observes afterwards,
// so the agent reports facts rather than intentions. Preconditions that hold for every
// hypervisor (instance exists, state allows the verb, capabilities) are checked by
// ../operations before a driver is called; drivers enforce what only they can know.
import type {
  DriverCapabilities,
  ImageInfo,
  InstanceSpec,
  LogSource,
  ObservedInstance,
  Operation,
  OperationKind,
  SnapshotInfo,
  VmmStats,
} from "@offshoot/shared";
import type { Guest } from "../guest/link.ts";

/** Journals a completed step before the operation moves on, so a crash can be undone. */
export interface StepRecorder {
  record(step: string): Promise<void>;
}

export interface OpContext {
  /** The command being executed; drivers may tag what they create with it. */
  readonly commandId: string;
  readonly steps: StepRecorder;
}

/** The logs a driver keeps; `hypeman`, the operations log, is the agent's own. */
export type DriverLogSource = Exclude<LogSource, "hypeman">;

/** One operation's data as the protocol carries it, e.g. OpData<"fork">. */
export type OpData<K extends OperationKind> = Omit<Extract<Operation, { kind: K }>, "kind">;

export interface Driver {
  readonly name: string;
  capabilities(): DriverCapabilities;
  /** Every instance on this host, including ones the control plane may not know (orphans). */
  inventory(): Promise<ObservedInstance[]>;
  /** The ids of the snapshots this host holds. */
  snapshotIds(): Promise<string[]>;
  /** The images instances can be created from ([] for a driver that needs none). */
  images(): Promise<ImageInfo[]>;
  /** Rootfs files its instances boot: the image cache never evicts these. */
  rootfsInUse(): Promise<Set<string>>;
  /** Keys of the volumes its instances attach: those are not deleted. */
  volumesInUse(): Promise<Set<string>>;
  /** null when the host has no such instance. */
  get(id: string): Promise<ObservedInstance | null>;

  /** Creates and boots: resolves Running. */
  create(spec: InstanceSpec, ctx: OpContext): Promise<ObservedInstance>;
  /** Stopped → Running (cold boot), optionally overriding entrypoint/cmd. */
  start(op: OpData<"start">, ctx: OpContext): Promise<ObservedInstance>;
  /** → Stopped: no VMM, no snapshot. */
  stop(id: string, ctx: OpContext): Promise<ObservedInstance>;
  /** Running → Standby: snapshot memory and device state, then release the VMM. */
  standby(id: string, ctx: OpContext): Promise<ObservedInstance>;
  /** Standby → Running from the snapshot. */
  restore(id: string, ctx: OpContext): Promise<ObservedInstance>;
  /** Removes the instance and its files. Idempotent: a missing instance is already deleted. */
  delete(id: string, ctx: OpContext): Promise<void>;
  /** Clones a Stopped or Standby source into `target` and brings it to `target_state`.
   * The source is left as it was. Resolves [source, target]. */
  fork(op: OpData<"fork">, ctx: OpContext): Promise<[ObservedInstance, ObservedInstance]>;

  /** Captures a Stopped (kind Stopped) or Standby (kind Standby) instance as a snapshot that
   * shares its files copy-on-write; the instance is left as it was. `fork` with
   * `from_snapshot` forks from it. */
  snapshotCreate(
    op: OpData<"snapshot_create">,
    ctx: OpContext,
  ): Promise<{ instance: ObservedInstance; snapshot: SnapshotInfo }>;
  /** Puts a Stopped or Standby instance back to a snapshot (its disk, and its memory for a
   * Standby one), then brings it to `target_state`. */
  snapshotRestore(op: OpData<"snapshot_restore">, ctx: OpContext): Promise<ObservedInstance>;
  /** Removes a snapshot's files; idempotent. Forks made from it keep working. */
  snapshotDelete(id: string): Promise<void>;
  /** Keeps a Standby snapshot's memory compressed at rest (capability snapshot_compression);
   * idempotent. Forks and restores from it keep working. */
  snapshotCompress(op: OpData<"snapshot_compress">): Promise<SnapshotInfo>;

  /** After a crash: undoes what an interrupted operation did (it recorded `steps`, and may have
   * been part-way through the next one), then returns the involved instances as observed. */
  rollback(
    op: Operation,
    ctx: { commandId: string; steps: readonly string[] },
  ): Promise<ObservedInstance[]>;

  /** The running guest's agent, greeted (waiting up to `waitMs` for it): exec and stat. */
  guest(id: string, waitMs: number): Promise<Guest>;
  /** What the running instance's VMM costs. */
  stats(id: string): Promise<VmmStats>;

  /** What guests' memory really costs this host (MemoryReport): undefined for a driver with no
   * real guests. */
  memoryReport?(): Promise<{ available_bytes: number; charges: { id: string; bytes: number }[] }>;

  /** Where the driver keeps a log of an instance: "app" is the guest's console, "vmm" the
   * hypervisor's output. undefined when the driver has no such log. */
  logFile(id: string, source: DriverLogSource): string | undefined;

  /** State changes the driver observes on its own (guest exited, VMM died). Returns an
   * unsubscribe function. */
  onEvent(listener: (instance: ObservedInstance) => void): () => void;
  /** Releases driver resources (QMP sockets, watchers); instances keep running. */
  close(): Promise<void>;
}
