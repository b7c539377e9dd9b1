import { type Instance, VERB_FROM } from "@offshoot/shared";
import { type Call, newCall, type Services } from "../context.ts";
import { requireStandby, runVerb } from "./lifecycle.ts";

/** POST /instances/{id}/standby: pause, snapshot memory and devices, release the VMM. */
export function standbyInstance(
  s: Services,
  tenantId: string,
  ref: string,
  call: Call = newCall(s),
): Promise<Instance> {
  return runVerb(s, tenantId, ref, call, {
    name: "standby",
    from: VERB_FROM.standby,
    resident: false,
    check: requireStandby,
    operation: (row) => ({ kind: "standby", instance_id: row.id }),
  });
}
