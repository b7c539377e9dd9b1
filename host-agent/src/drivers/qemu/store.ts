// One JSON record per QEMU instance, beside its disk and RAM file. The QEMU process outlives the
// agent; the record (pid, QMP socket by path) is how a restarted agent finds it again.
import { randomBytes } from "node:crypto";
import { readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { InstanceSpec, ObservedInstance } from "@offshoot/shared";
import { z } from "zod";
import type { AgentPaths } from "../../paths.ts";

/** What fixes the guest's device layout. A device-state stream only loads into a QEMU with the
 * same layout, so a restore or fork reuses this, not a possibly different spec. */
export const Machine = z.object({
  memory_mib: z.number().int().positive(),
  vcpus: z.number().int().positive(),
  /** null: no NIC. */
  mac: z.string().nullable(),
});
export type Machine = z.infer<typeof Machine>;

export const QemuRecord = z.object({
  /** The command that created it, so crash recovery removes only its own half-made target. */
  created_by: z.string(),
  spec: InstanceSpec,
  machine: Machine,
  observed: ObservedInstance,
  /** The QEMU process while Running. */
  pid: z.number().int().nullable(),
  /** Byte offset in serial.log where the current boot's output begins (the log is appended
   * across boots and restores). */
  serial_offset: z.number().int().nonnegative(),
});
export type QemuRecord = z.infer<typeof QemuRecord>;

export type ReadResult =
  | { kind: "missing" }
  | { kind: "ok"; record: QemuRecord }
  | { kind: "corrupt"; error: string };

export function isMissing(e: unknown): boolean {
  return (e as NodeJS.ErrnoException | undefined)?.code === "ENOENT";
}

export class QemuStore {
  constructor(private readonly paths: AgentPaths["qemu"]) {}

  async ids(): Promise<string[]> {
    try {
      const entries = await readdir(this.paths.instancesDir, { withFileTypes: true });
      return entries.filter((e) => e.isDirectory()).map((e) => e.name);
    } catch (e) {
      if (isMissing(e)) return [];
      throw e;
    }
  }

  async read(id: string): Promise<ReadResult> {
    let text: string;
    try {
      text = await readFile(this.paths.stateFile(id), "utf8");
    } catch (e) {
      if (isMissing(e)) return { kind: "missing" };
      throw e;
    }
    try {
      return { kind: "ok", record: QemuRecord.parse(JSON.parse(text)) };
    } catch (e) {
      return { kind: "corrupt", error: e instanceof Error ? e.message : String(e) };
    }
  }

  /** Temp + rename, so a reader never sees half a file. */
  async write(record: QemuRecord): Promise<void> {
    const file = this.paths.stateFile(record.observed.id);
    const tmp = `${file}.${randomBytes(4).toString("hex")}.tmp`;
    await writeFile(tmp, JSON.stringify(record));
    await rename(tmp, file);
  }

  async remove(id: string): Promise<void> {
    await rm(this.paths.instanceDir(id), { recursive: true, force: true });
    await rm(this.paths.qmpSocket(id), { force: true });
    await rm(this.paths.ctlSocket(id), { force: true });
  }
}
