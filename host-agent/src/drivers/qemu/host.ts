// What the QEMU driver's verbs share: the host's paths, the instance records, the driver's
// options, and the QMP connections open to running guests. The driver owns one and passes it to
// the step modules (boot, stop, snapshot, fork, recovery), which hold no state of their own.
import { InvalidStateError, NotFoundError, type ObservedInstance } from "@offshoot/shared";
import type { GuestLink } from "../../guest/link.ts";
import type { ImageStore } from "../../images/store.ts";
import type { HostNetwork } from "../../network/index.ts";
import type { InstanceLocks } from "../../operations/locks.ts";
import type { AgentPaths } from "../../paths.ts";
import type { Slots } from "../../slots.ts";
import type { VolumeStore } from "../../volumes.ts";
import type { CopyPath, DiskTools } from "./disks.ts";
import type { Accel } from "./launch.ts";
import type { QmpClient } from "./qmp.ts";
import type { QemuRecord, QemuStore } from "./store.ts";

export interface QemuDriverOptions {
  assets: { qemu: string; kernelElf: string; initramfs: string };
  accel: Accel;
  /** Where instances' images come from: a create names one this host has imported. */
  images: ImageStore;
  /** Where volumes' files are; absent: this host attaches no volumes. */
  volumes?: VolumeStore;
  /** The host's guest network (bridge, TAPs, NAT); absent: guests' NICs reach nothing (nic.ts). */
  network?: HostNetwork;
  qemuImg?: string;
  /** Launch → /init's ready marker. Boot under TCG takes 3.5–5 s here (FACTS.md). */
  bootTimeoutMs?: number;
  /** Bound on the identity command after a restore (default 30 s). */
  controlTimeoutMs?: number;
  /** stop: how long a guest's program gets after SIGTERM before QEMU is quit (default 10 s). */
  stopTimeoutMs?: number;
  /** How often running guests' serial logs and processes are checked for an exit. */
  pollMs?: number;
  /** Guests launched at once (default 2): a boot until its ready marker, a restore until the
   * guest has confirmed its identity. */
  launchConcurrency?: number;
}

export interface QemuHost {
  readonly paths: AgentPaths["qemu"];
  readonly store: QemuStore;
  readonly options: QemuDriverOptions;
  readonly tools: DiskTools;
  /** Open QMP connections, by instance id. */
  readonly qmps: Map<string, QmpClient>;
  /** Tells the driver's listeners of a change it observed on its own (a guest's exit). */
  readonly emit: (instance: ObservedInstance) => void;
  /** How the last fork and restore went (for reports and tests). */
  readonly last: LastClone;
  /** Guest subnets whose bridge is set up, by CIDR (once per agent life; nic.ts). */
  readonly subnets: Map<string, Promise<void>>;
  /** Instances' TAPs made or adopted this agent life, with the limits they were given. */
  readonly nics: Map<string, { key: string; ready: Promise<void> }>;
  /** Guest agents' channels open now, by instance id (guest.ts). */
  readonly links: Map<string, GuestLink>;
  /** Launches under way, bounded (options.launchConcurrency). */
  readonly launches: Slots;
  /** Compressed snapshots' payloads: thawing, recording and releasing one hold its id. */
  readonly payloads: InstanceLocks;
  /** Forks and restores under way from each compressed snapshot's thawed copy (compression.ts). */
  readonly thawUsers: Map<string, number>;
  /** Whether the data dir makes reflinks: probed once, by the first fork. */
  reflinks?: Promise<boolean>;
  /** The same host over each directory of records: instances (the host itself), snapshots, and
   * a snapshot restore's new and old files. */
  readonly views: Record<"instances" | "snapshots" | "restoring" | "replaced", QemuHost>;
}

export interface LastClone {
  /** How the last fork from Standby cloned guest memory: mapped from a frozen base, or (RAM
   * inside the snapshot stream) copied or reflinked. */
  copyPath: CopyPath | "frozen-base" | undefined;
  /** How the last fork cloned the disk: a reflink (where the data dir can) or qcow2 overlays
   * on a frozen base. */
  diskClone: "reflink" | "overlay" | undefined;
  /** How long the last restore took to apply the guest's identity. */
  identityMs: number | undefined;
}

export const now = () => new Date().toISOString();

/** The instance's record, for an operation that needs one. */
export async function load(host: QemuHost, id: string): Promise<QemuRecord> {
  const read = await host.store.read(id);
  if (read.kind === "ok") return read.record;
  if (read.kind === "missing") throw new NotFoundError(`instance ${id} not found on this host`);
  throw new InvalidStateError(`instance ${id} is Unknown: state file unreadable: ${read.error}`);
}
