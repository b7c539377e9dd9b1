// One JSON record per QEMU instance, beside its disk and RAM file. The QEMU process outlives the
// agent; the record (pid, QMP socket by path) is how a restarted agent finds it again.
import { rm } from "node:fs/promises";
import { InstanceSpec, ObservedInstance, SnapshotCompression } from "@offshoot/shared";
import { z } from "zod";
import { StoredImage } from "../../images/store.ts";
import type { AgentPaths } from "../../paths.ts";
import { RecordStore } from "../record-store.ts";

/** What fixes the guest's device layout. A device-state stream only loads into a QEMU with the
 * same layout, so a restore or fork reuses this, not a possibly different spec. */
export const Machine = z.object({
  memory_mib: z.number().int().positive(),
  vcpus: z.number().int().positive(),
  /** null: no NIC. */
  mac: z.string().nullable(),
  /** The guest agent's virtio-serial port (AGENT_PORT). Absent in records from before it: such a
   * guest restores and forks without it and has no exec until it is booted afresh. */
  agent_port: z.boolean().default(false),
});
export type Machine = z.infer<typeof Machine>;

export const QemuRecord = z.object({
  /** The command that created it, so crash recovery removes only its own half-made target. */
  created_by: z.string(),
  spec: InstanceSpec,
  /** The image as it was when the instance was created: its rootfs and launch defaults. */
  image: StoredImage,
  machine: Machine,
  observed: ObservedInstance,
  /** The QEMU process while Running. */
  pid: z.number().int().nullable(),
  /**
   * Where guest RAM lives. "file": the instance's own RAM file, mapped shared (standby writes
   * only device state). "base": a fork's RAM, a frozen file shared with its source and siblings
   * (ram_base), mapped private, so the guest's writes go to its own pages and the file never
   * changes. "frozen": Standby only; a forked source's snapshot RAM, now that memory base; its
   * restore takes a writable copy of it (a reflink where the filesystem can). "stream":
   * Standby only; the RAM is inside the device-state file (a "base" guest's standby must
   * write it there).
   */
  ram: z.enum(["file", "base", "frozen", "stream"]).default("file"),
  ram_base: z.string().nullable().default(null),
  /** A snapshot's disk where the data dir makes no reflinks: the frozen base it was captured as
   * (it has no overlay of its own); forks from it put their overlays on this base. */
  disk_base: z.string().nullable().default(null),
  /** A Standby snapshot whose memory is kept compressed (compression.ts): the compressed file
   * and its sizes. While forks use it, ram_base (or the stream) is its decompressed copy. */
  compressed: z
    .object({
      file: z.string(),
      algorithm: SnapshotCompression,
      level: z.number().int(),
      compressed_bytes: z.number().int().nonnegative(),
      uncompressed_bytes: z.number().int().nonnegative(),
    })
    .nullable()
    .default(null),
  /** The identity ("hostname MAC|-") the guest's memory holds: set at boot and by every
   * identity command; a fork's is its source's until its first restore applies its own. */
  guest_identity: z.string().nullable().default(null),
  /** Byte offset in serial.log where the current boot's output begins (the log is appended
   * across boots and restores). */
  serial_offset: z.number().int().nonnegative(),
});
export type QemuRecord = z.infer<typeof QemuRecord>;

export class QemuStore extends RecordStore<QemuRecord> {
  constructor(private readonly paths: AgentPaths["qemu"]) {
    super(paths, QemuRecord);
  }

  override async remove(id: string): Promise<void> {
    await super.remove(id);
    await rm(this.paths.qmpSocket(id), { force: true });
    await rm(this.paths.ctlSocket(id), { force: true });
    await rm(this.paths.agentSocket(id), { force: true });
  }
}
