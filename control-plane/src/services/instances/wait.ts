import {
  ClientGoneError,
  type InstanceState,
  InvalidRequestError,
  NotFoundError,
  parseDuration,
  UnitParseError,
  type WaitForStateResponse,
} from "@offshoot/shared";
import { and, eq } from "drizzle-orm";
import { instances } from "../../db/schema/index.ts";
import { type Services, topics } from "../context.ts";
import { resolveInstance } from "./resolve.ts";

export const MAX_WAIT_MS = 5 * 60_000;

export function parseWaitTimeout(timeout: string | undefined): number {
  if (timeout === undefined) return 60_000;
  try {
    return Math.min(parseDuration(timeout), MAX_WAIT_MS);
  } catch (e) {
    if (e instanceof UnitParseError) throw new InvalidRequestError(e.message);
    throw e;
  }
}

/**
 * GET /instances/{id}/wait: blocks until the instance is in `state`, the timeout passes, or
 * it lands in Unknown (an error state that no wait should sit through).
 */
export async function waitForState(
  s: Services,
  tenantId: string,
  ref: string,
  state: InstanceState,
  timeoutMs: number,
  signal?: AbortSignal,
): Promise<WaitForStateResponse> {
  const { id, name } = await resolveInstance(s.db, tenantId, ref);
  // From here a change to the instance, on any replica, wakes this wait (tests wait for it).
  s.log("debug", "waiting for a state", { instance_id: id, state });
  const read = async () => {
    const [row] = await s.db
      .select({ state: instances.state, stateError: instances.stateError })
      .from(instances)
      .where(and(eq(instances.id, id), eq(instances.tenantId, tenantId)));
    if (!row) throw new NotFoundError(`instance ${name} was deleted while waiting`);
    return row;
  };
  const done = await s.signals.until(
    topics.instance(id),
    timeoutMs,
    async () => {
      const row = await read();
      return row.state === state || row.state === "Unknown" ? row : undefined;
    },
    { signal },
  );
  // Nobody is listening any more: no last read.
  if (signal?.aborted) {
    s.log("debug", "wait ended: its client went away", { instance_id: id });
    throw new ClientGoneError();
  }
  const last = done ?? (await read());
  return {
    state: last.state,
    state_error: last.state === "Unknown" ? last.stateError : null,
    timed_out: done === undefined,
  };
}
