import { type Instance, type StartInstanceRequest, VERB_FROM } from "@offshoot/shared";
import { type Call, newCall, type Services } from "../context.ts";
import { runVerb } from "./lifecycle.ts";

/** POST /instances/{id}/start: boot a Stopped instance, optionally with a new entrypoint/cmd. */
export function startInstance(
  s: Services,
  tenantId: string,
  ref: string,
  body: StartInstanceRequest,
  call: Call = newCall(s),
): Promise<Instance> {
  return runVerb(s, tenantId, ref, call, {
    name: "start",
    from: VERB_FROM.start,
    resident: true,
    operation: (row) => ({
      kind: "start",
      instance_id: row.id,
      entrypoint: body.entrypoint ?? null,
      cmd: body.cmd ?? null,
    }),
  });
}
