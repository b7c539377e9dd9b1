import { type Instance, VERB_FROM } from "@offshoot/shared";
import { type Call, newCall, type Services } from "../context.ts";
import { requireStandby, runVerb } from "./lifecycle.ts";

/** POST /instances/{id}/restore: bring a Standby instance back to Running from its snapshot. */
export function restoreInstance(
  s: Services,
  tenantId: string,
  ref: string,
  call: Call = newCall(s),
): Promise<Instance> {
  return runVerb(s, tenantId, ref, call, {
    name: "restore",
    from: VERB_FROM.restore,
    resident: true,
    check: requireStandby,
    operation: (row) => ({ kind: "restore", instance_id: row.id }),
  });
}
