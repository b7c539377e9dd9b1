// Multi-step work the control plane drives itself, recorded as an `operations` row whose
// children are the host commands it issues. The payload is read back by whichever process
// resumes the flow, so it is parsed, not trusted.
import { z } from "zod";
import { ForkTargetState } from "./schemas.ts";

/** A fork: with `from_running` the source is put into standby first and restored after. The same
 * flow captures a snapshot of a Running instance (`snapshot`). */
export const ForkFlowPayload = z.object({
  kind: z.literal("fork_flow"),
  source_id: z.string(),
  target_id: z.string(),
  from_running: z.boolean(),
  target_state: ForkTargetState,
  /** source_id is a snapshot (a fork from a snapshot: never from_running). */
  from_snapshot: z.boolean().optional(),
  /** The flow captures a snapshot of a Running source, target_id: standby, snapshot_create,
   * restore; rolled back by snapshot_delete. */
  snapshot: z.boolean().optional(),
});
export type ForkFlowPayload = z.infer<typeof ForkFlowPayload>;
