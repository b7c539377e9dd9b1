// The QEMU driver: real microvm guests (launch.ts), one directory and one JSON record per
// instance (store.ts). QEMU runs detached, so guests outlive the agent; a restarted agent finds
// them by the recorded pid and the QMP socket path (discovery.ts, recovery.ts).
//
// This class is the table of verbs: it holds what they share (QemuHost: records, QMP
// connections), the per-instance locks and the event listeners, and delegates each verb to its
// module — boot.ts (create, start), stop.ts, snapshot.ts (standby, restore), fork.ts. A guest's
// disks and config come from guest-config.ts and disks.ts; its exit is watched by exit.ts.
import type {
  DriverCapabilities,
  ImageInfo,
  InstanceSpec,
  ObservedInstance,
  Operation,
  SnapshotInfo,
  VmmStats,
} from "@offshoot/shared";
import { compressorsInstalled } from "../../compressors.ts";
import type { Guest } from "../../guest/link.ts";
import { InstanceLocks } from "../../operations/locks.ts";
import type { AgentPaths } from "../../paths.ts";
import { Slots } from "../../slots.ts";
import type { Driver, DriverLogSource, OpContext, OpData } from "../driver.ts";
import { rollbackOperation } from "../rollback.ts";
import { create, start } from "./boot.ts";
import { snapshotCompress } from "./compression.ts";
import { reconcile } from "./exit.ts";
import { fork } from "./fork.ts";
import { endGuestSessions, guestLink, vmmStats } from "./guest.ts";
import { attachedVolumes, MIN_GUEST_MEMORY } from "./guest-config.ts";
import type { LastClone, QemuDriverOptions, QemuHost } from "./host.ts";
import { adoptNics } from "./nic.ts";
import { discard, gc, memAvailableBytes, privateBytes } from "./processes.ts";
import { converge } from "./recovery.ts";
import { restore, standby } from "./snapshot.ts";
import { settleRestore, snapshotCreate, snapshotDelete, snapshotRestore } from "./snapshots.ts";
import { stop } from "./stop.ts";
import { type QemuRecord, QemuStore } from "./store.ts";

export class QemuDriver implements Driver {
  readonly name = "qemu";
  private readonly host: QemuHost;
  private readonly last: LastClone = {
    copyPath: undefined,
    diskClone: undefined,
    identityMs: undefined,
  };
  private readonly listeners = new Set<(instance: ObservedInstance) => void>();
  private readonly locks = new Map<string, Promise<unknown>>();
  /** Ids with an operation queued or running (count), which get() must not wait behind. */
  private readonly operating = new Map<string, number>();
  private readonly poller: NodeJS.Timeout;
  private polling = false;
  private readonly compressors = compressorsInstalled();

  constructor(agentPaths: AgentPaths, options: QemuDriverOptions) {
    const paths = agentPaths.qemu;
    const views = {} as QemuHost["views"];
    this.host = {
      paths,
      store: new QemuStore(paths),
      options,
      tools: { qemuImg: options.qemuImg ?? "/usr/bin/qemu-img" },
      qmps: new Map(),
      subnets: new Map(),
      nics: new Map(),
      links: new Map(),
      emit: (instance) => {
        for (const l of this.listeners) l(instance);
      },
      last: this.last,
      views,
      launches: new Slots(options.launchConcurrency ?? 2),
      payloads: new InstanceLocks(),
      thawUsers: new Map(),
    };
    const over = (p: AgentPaths["qemu"]): QemuHost => ({
      ...this.host,
      paths: p,
      store: new QemuStore(p),
    });
    Object.assign(views, {
      instances: this.host,
      snapshots: over(agentPaths.qemuSnapshots),
      restoring: over(agentPaths.qemuRestoring),
      replaced: over(agentPaths.qemuReplaced),
    });
    this.poller = setInterval(() => void this.poll(), options.pollMs ?? 500);
    this.poller.unref();
  }

  /** How the last fork from Standby cloned guest memory (for reports and tests): mapped from a
   * frozen base, or (RAM inside the snapshot stream) copied or reflinked. */
  get lastCopyPath(): LastClone["copyPath"] {
    return this.last.copyPath;
  }

  /** How the last fork cloned the disk: a reflink (where the data dir can) or qcow2 overlays
   * on a frozen base. */
  get lastDiskClone(): LastClone["diskClone"] {
    return this.last.diskClone;
  }

  /** How long the last restore took to apply the guest's identity (for reports and tests). */
  get lastIdentityMs(): number | undefined {
    return this.last.identityMs;
  }

  capabilities(): DriverCapabilities {
    return {
      hypervisors: ["qemu"],
      fork_from_stopped: true,
      fork_from_standby: true,
      standby: true,
      // microvm has no memory hotplug.
      hotplug_memory: false,
      disk_io_limit: true,
      volumes: this.host.options.volumes !== undefined,
      images: true,
      min_memory_bytes: MIN_GUEST_MEMORY,
      snapshot_compression: this.compressors,
    };
  }

  /** At start: the TAPs (and bridges) of this host's instances made again or adopted as they
   * are, and those of instances it no longer has removed. */
  adoptNetwork(): Promise<{ taps: number; removed: number; failed: string[] }> {
    return adoptNics(this.host);
  }

  async images(): Promise<ImageInfo[]> {
    return (await this.host.options.images.list()).map(({ rootfs: _, user: _u, ...info }) => info);
  }

  async volumesInUse(): Promise<Set<string>> {
    const { records, unreadable } = await this.records();
    if (unreadable) throw new Error(unreadable);
    return new Set(records.flatMap((r) => attachedVolumes(r.spec).map((v) => v.key)));
  }

  async rootfsInUse(): Promise<Set<string>> {
    const { records, unreadable } = await this.records();
    // A record that cannot be read keeps nothing safe: keep every rootfs then.
    if (unreadable) return new Set(["*"]);
    return new Set(records.map((r) => r.image.rootfs));
  }

  /** Every instance record, or why one of them cannot be read. */
  private async records(): Promise<{ records: QemuRecord[]; unreadable?: string }> {
    const records: QemuRecord[] = [];
    for (const id of await this.host.store.ids()) {
      const r = await this.host.store.read(id);
      if (r.kind === "corrupt") {
        return { records, unreadable: `instance record ${id} is unreadable: ${r.error}` };
      }
      if (r.kind === "ok") records.push(r.record);
    }
    return { records };
  }

  async inventory(): Promise<ObservedInstance[]> {
    const found = await Promise.all((await this.host.store.ids()).map((id) => this.get(id)));
    return found.filter((i): i is ObservedInstance => i !== null);
  }

  snapshotIds(): Promise<string[]> {
    return this.host.views.snapshots.store.ids();
  }

  async get(id: string): Promise<ObservedInstance | null> {
    const read = await this.host.store.read(id);
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
      const fresh = await this.host.store.read(id);
      if (fresh.kind !== "ok") return read.record.observed;
      return (await reconcile(this.host, fresh.record)).observed;
    });
  }

  create(spec: InstanceSpec, ctx: OpContext): Promise<ObservedInstance> {
    return this.locked(spec.id, () => create(this.host, spec, ctx));
  }

  start(op: OpData<"start">, ctx: OpContext): Promise<ObservedInstance> {
    return this.locked(op.instance_id, () => start(this.host, op, ctx));
  }

  stop(id: string, ctx: OpContext): Promise<ObservedInstance> {
    return this.locked(id, async () => {
      await endGuestSessions(this.host, id, "the instance is stopping");
      return stop(this.host, id, ctx);
    });
  }

  standby(id: string, ctx: OpContext): Promise<ObservedInstance> {
    return this.locked(id, async () => {
      await endGuestSessions(this.host, id, "the instance is going to standby");
      return standby(this.host, id, ctx);
    });
  }

  guest(id: string, waitMs: number): Promise<Guest> {
    return guestLink(this.host, id, waitMs);
  }

  stats(id: string): Promise<VmmStats> {
    return vmmStats(this.host, id);
  }

  restore(id: string, ctx: OpContext): Promise<ObservedInstance> {
    return this.locked(id, () => restore(this.host, id, ctx));
  }

  async delete(id: string, ctx: OpContext): Promise<void> {
    await this.locked(id, async () => {
      await endGuestSessions(this.host, id, "the instance is being deleted");
      await discard(this.host, id);
      await gc(this.host);
      await ctx.steps.record("delete");
    });
  }

  snapshotCreate(
    op: OpData<"snapshot_create">,
    ctx: OpContext,
  ): Promise<{ instance: ObservedInstance; snapshot: SnapshotInfo }> {
    return this.locked(op.instance_id, () =>
      this.locked(op.snapshot_id, () => snapshotCreate(this.host, op, ctx)),
    );
  }

  snapshotRestore(op: OpData<"snapshot_restore">, ctx: OpContext): Promise<ObservedInstance> {
    return this.locked(op.instance_id, () =>
      this.locked(op.snapshot_id, () => snapshotRestore(this.host, op, ctx)),
    );
  }

  snapshotDelete(id: string): Promise<void> {
    return this.locked(id, () => snapshotDelete(this.host, id));
  }

  snapshotCompress(op: OpData<"snapshot_compress">): Promise<SnapshotInfo> {
    return this.locked(op.snapshot_id, () => snapshotCompress(this.host, op, () => gc(this.host)));
  }

  fork(op: OpData<"fork">, ctx: OpContext): Promise<[ObservedInstance, ObservedInstance]> {
    const target = () => this.locked(op.target.id, () => fork(this.host, op, ctx));
    // A snapshot is never written: its forks run side by side (its delete is refused by the
    // control plane while they are pending).
    return op.from_snapshot ? target() : this.locked(op.source_id, target);
  }

  rollback(
    op: Operation,
    ctx: { commandId: string; steps: readonly string[] },
  ): Promise<ObservedInstance[]> {
    return rollbackOperation(op, ctx.commandId, {
      get: (id) => this.get(id),
      ownedBy: (id, commandId) => this.host.store.ownedBy(id, commandId),
      discard: (id) => discard(this.host, id),
      remove: async (id) => {
        await discard(this.host, id);
        await gc(this.host);
      },
      converge: (id) => converge(this.host, id),
      discardSnapshot: async (id, commandId) => {
        if (await this.host.views.snapshots.store.ownedBy(id, commandId)) {
          await snapshotDelete(this.host, id);
        }
      },
      settleRestore: async (id) => {
        await settleRestore(this.host, id);
        await gc(this.host);
      },
    });
  }

  /** The host's MemAvailable, and what each Running guest mapping a shared memory base holds
   * alone: its QEMU's private pages (the pages its guest wrote since the fork, and QEMU's own
   * heap and translation cache). A guest with its own RAM file is left out: it is charged its
   * size, which its file may grow to. */
  async memoryReport(): Promise<{
    available_bytes: number;
    charges: { id: string; bytes: number }[];
  }> {
    const { records } = await this.records();
    const charges: { id: string; bytes: number }[] = [];
    for (const r of records) {
      if (r.pid === null || r.ram !== "base" || r.observed.state !== "Running") continue;
      const bytes = privateBytes(r.pid);
      if (bytes !== undefined) charges.push({ id: r.observed.id, bytes });
    }
    return { available_bytes: memAvailableBytes(), charges };
  }

  logFile(id: string, source: DriverLogSource): string | undefined {
    return source === "app" ? this.host.paths.serialLog(id) : this.host.paths.qemuLog(id);
  }

  onEvent(listener: (instance: ObservedInstance) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  async close(): Promise<void> {
    clearInterval(this.poller);
    this.listeners.clear();
    for (const link of this.host.links.values()) link.close("the host agent is shutting down");
    this.host.links.clear();
    const clients = [...this.host.qmps.values()];
    this.host.qmps.clear();
    await Promise.all(clients.map((c) => c.close()));
  }

  /** Running guests are checked for an exit, except those an operation holds. */
  private async poll(): Promise<void> {
    if (this.polling) return;
    this.polling = true;
    try {
      for (const id of await this.host.store.ids()) {
        if (this.operating.has(id)) continue;
        await this.observing(id, async () => {
          const read = await this.host.store.read(id);
          if (read.kind === "ok") await reconcile(this.host, read.record);
        });
      }
    } catch {
      // The next tick retries; an instance removed mid-poll is not an error.
    } finally {
      this.polling = false;
    }
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
}
