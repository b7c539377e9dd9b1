// One JSON record per instance, in the instance's own directory: how a driver's state outlives
// the agent (a QEMU process, or the sim's stand-in for one) and is found again after a restart.
import { randomBytes } from "node:crypto";
import { readFileSync, renameSync, type Stats, statSync, writeFileSync } from "node:fs";
import { readdir, rm } from "node:fs/promises";
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
    statSync(file);
    return true;
  } catch (e) {
    if (isMissing(e)) return false;
    throw e;
  }
}

/** What changes when a file is replaced or rewritten. */
const fileKey = (st: Stats) => `${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;

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

  // Records are a few hundred bytes: they are read and written with synchronous calls, which
  // cost microseconds, where each trip through libuv's thread pool cost a few hundred (measured
  // under load). Removing an instance's directory, disks and all, stays asynchronous.
  //
  // The last record read or written per instance (a private copy), with the file's identity
  // at that time: a read whose stat still matches is answered without reading and parsing the
  // file again.
  private readonly cache = new Map<string, { key: string; record: T }>();

  async read(id: string): Promise<ReadResult<T>> {
    const file = this.layout.stateFile(id);
    let key: string;
    let text: string;
    try {
      key = fileKey(statSync(file));
      const hit = this.cache.get(id);
      if (hit?.key === key) return { kind: "ok", record: structuredClone(hit.record) };
      // Replaced between the stat and this read? Then the key is older than the text, and the
      // next read's stat misses and reads again.
      text = readFileSync(file, "utf8");
    } catch (e) {
      this.cache.delete(id);
      if (isMissing(e)) return { kind: "missing" };
      throw e;
    }
    try {
      const record = this.schema.parse(JSON.parse(text));
      this.cache.set(id, { key, record: structuredClone(record) });
      return { kind: "ok", record };
    } catch (e) {
      this.cache.delete(id);
      return { kind: "corrupt", error: e instanceof Error ? e.message : String(e) };
    }
  }

  /** Temp + rename, so a reader never sees half a file. No fsync: records describe processes
   * that survive an agent crash; the journal is what is fsync'd. */
  async write(record: T): Promise<void> {
    const id = record.observed.id;
    const file = this.layout.stateFile(id);
    const tmp = `${file}.${randomBytes(4).toString("hex")}.tmp`;
    this.cache.delete(id);
    writeFileSync(tmp, JSON.stringify(record));
    const key = fileKey(statSync(tmp));
    renameSync(tmp, file);
    this.cache.set(id, { key, record: structuredClone(record) });
  }

  /** Drops the cached record of `id` (its directory is going away). */
  protected forget(id: string): void {
    this.cache.delete(id);
  }

  /** Whether `commandId` made the record under `id` (or there is none yet). */
  async ownedBy(id: string, commandId: string): Promise<boolean> {
    const read = await this.read(id);
    return read.kind === "missing" || (read.kind === "ok" && read.record.created_by === commandId);
  }

  async remove(id: string): Promise<void> {
    this.forget(id);
    await rm(this.layout.instanceDir(id), { recursive: true, force: true });
  }
}
