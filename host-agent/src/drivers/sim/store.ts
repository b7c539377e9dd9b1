// The sim's "hypervisor state": one JSON file per instance. Like a QEMU process it outlives the
// agent, so instances survive a kill -9 of the agent and reappear in the next inventory.
import { appendFileSync, rmSync } from "node:fs";
import { InstanceSpec, ObservedInstance } from "@offshoot/shared";
import { z } from "zod";
import type { AgentPaths } from "../../paths.ts";
import { RecordStore } from "../record-store.ts";

export const SimRecord = z.object({
  /** The command that created it: lets crash recovery tell its own half-made fork target
   * from an instance that already existed under that id. */
  created_by: z.string(),
  spec: InstanceSpec,
  observed: ObservedInstance,
});
export type SimRecord = z.infer<typeof SimRecord>;

export class SimStore extends RecordStore<SimRecord> {
  constructor(private readonly paths: AgentPaths["sim"]) {
    super(paths, SimRecord);
  }

  override async write(record: SimRecord): Promise<void> {
    await super.write(record);
    // The simulated guest "prints" each state it enters, so its console log has content.
    const { id, state } = record.observed;
    appendFileSync(this.paths.consoleLog(id), `${new Date().toISOString()} sim: ${state}\n`);
  }

  /** A sim instance's directory holds a few small files (see the sim driver's header). */
  override async remove(id: string): Promise<void> {
    this.forget(id);
    rmSync(this.paths.instanceDir(id), { recursive: true, force: true });
  }
}
