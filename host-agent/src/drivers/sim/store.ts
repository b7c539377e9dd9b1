// The sim's "hypervisor state": one JSON file per instance. Like a QEMU process it outlives the
// agent, so instances survive a kill -9 of the agent and reappear in the next inventory.
import { randomBytes } from "node:crypto";
import { appendFile, readdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { InstanceSpec, ObservedInstance } from "@offshoot/shared";
import { z } from "zod";
import type { AgentPaths } from "../../paths.ts";

export const SimRecord = z.object({
  /** The command that created it: lets crash recovery tell its own half-made fork target
   * from an instance that already existed under that id. */
  created_by: z.string(),
  spec: InstanceSpec,
  observed: ObservedInstance,
});
export type SimRecord = z.infer<typeof SimRecord>;

export type ReadResult =
  | { kind: "missing" }
  | { kind: "ok"; record: SimRecord }
  | { kind: "corrupt"; error: string };

export function isMissing(e: unknown): boolean {
  return (e as NodeJS.ErrnoException | undefined)?.code === "ENOENT";
}

export class SimStore {
  constructor(private readonly paths: AgentPaths["sim"]) {}

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
      return { kind: "ok", record: SimRecord.parse(JSON.parse(text)) };
    } catch (e) {
      return { kind: "corrupt", error: e instanceof Error ? e.message : String(e) };
    }
  }

  /** Temp + rename, so a reader never sees half a file. No fsync: the sim models processes
   * surviving an agent crash, not a power cut, and fleet benchmarks run thousands of these. */
  async write(record: SimRecord): Promise<void> {
    const file = this.paths.stateFile(record.observed.id);
    const tmp = `${file}.${randomBytes(4).toString("hex")}.tmp`;
    await writeFile(tmp, JSON.stringify(record));
    await rename(tmp, file);
    // The simulated guest "prints" each state it enters, so its console log has content.
    const { id, state } = record.observed;
    await appendFile(this.paths.consoleLog(id), `${new Date().toISOString()} sim: ${state}\n`);
  }

  async remove(id: string): Promise<void> {
    await rm(this.paths.instanceDir(id), { recursive: true, force: true });
  }
}
