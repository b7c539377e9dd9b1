// result: the agent's answer to a command. The first one completes the operation with its
// effects (Operations.complete); later duplicates change nothing.
import type { Result } from "@offshoot/shared";
import type { Services } from "../context.ts";

/** Only an operation addressed to this host is completed, and only its rows are touched. */
export async function resultReceived(s: Services, hostId: string, result: Result): Promise<void> {
  await s.ops.complete(hostId, result);
}
