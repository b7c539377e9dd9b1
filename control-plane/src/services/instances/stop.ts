import { type Instance, VERB_FROM } from "@offshoot/shared";
import { type Call, newCall, type Services } from "../context.ts";
import { runVerb } from "./lifecycle.ts";

/** POST /instances/{id}/stop: graceful shutdown (the host forces it after a bounded wait). */
export function stopInstance(
  s: Services,
  tenantId: string,
  ref: string,
  call: Call = newCall(s),
): Promise<Instance> {
  return runVerb(s, tenantId, ref, call, {
    name: "stop",
    from: VERB_FROM.stop,
    resident: false,
    operation: (row) => ({ kind: "stop", instance_id: row.id }),
  });
}
