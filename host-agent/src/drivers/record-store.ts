// One JSON record per instance, in the instance's own directory: how a driver's state outlives
// the agent (a QEMU process, or the sim's stand-in for one) and is found again after a restart.
import { randomBytes } from "node:crypto";
import { readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import type { z } from "zod";

export type ReadResult<T> =
  | { kind: "missing" }
  | { kind: "ok"; record: T }
  | { kind: "corrupt"; error: string };

export function isMissing(e: unknown): boolean {
  return (e as NodeJS.ErrnoException | undefined)?.code === "ENOENT";
}

/** Whether `file` exists; errors other than "no such file" are thrown. */
export async function exists(file: string): Promise<boolean> {
  try {
    await stat(file);
    return true;
  } catch (e) {
    if (isMissing(e)) return false;
    throw e;
  }
}

export interface RecordLayout {
  readonly instancesDir: string;
  instanceDir(id: string): string;
  stateFile(id: string): string;
}

export class RecordStore<T extends { created_by: string; observed: { id: string } }> {
  constructor(
    protected readonly layout: RecordLayout,
    private readonly schema: z.ZodType<T>,
  ) {}

  async ids(): Promise<string[]> {
    try {
      const entries = await readdir(this.layout.instancesDir, { withFileTypes: true });
      return entries.filter((e) => e.isDirectory()).map((e) => e.name);
    } catch (e) {
      if (isMissing(e)) return [];
      throw e;
    }
  }

  async read(id: string): Promise<ReadResult<T>> {
    let text: string;
    try {
      text = await readFile(this.layout.stateFile(id), "utf8");
    } catch (e) {
      if (isMissing(e)) return { kind: "missing" };
      throw e;
    }
    try {
      return { kind: "ok", record: this.schema.parse(JSON.parse(text)) };
    } catch (e) {
      return { kind: "corrupt", error: e instanceof Error ? e.message : String(e) };
    }
  }

  /** Temp + rename, so a reader never sees half a file. No fsync: records describe processes
   * that survive an agent crash; the journal is what is fsync'd. */
  async write(record: T): Promise<void> {
    const file = this.layout.stateFile(record.observed.id);
    const tmp = `${file}.${randomBytes(4).toString("hex")}.tmp`;
    await writeFile(tmp, JSON.stringify(record));
    await rename(tmp, file);
  }

  /** Whether `commandId` made the record under `id` (or there is none yet). */
  async ownedBy(id: string, commandId: string): Promise<boolean> {
    const read = await this.read(id);
    return read.kind === "missing" || (read.kind === "ok" && read.record.created_by === commandId);
  }

  async remove(id: string): Promise<void> {
    await rm(this.layout.instanceDir(id), { recursive: true, force: true });
  }
}
