import type { ObservedInstance } from "@offshoot/shared";

/** A guest that is running now, with no snapshot and no exit on record. */
export function running(id: string, startedAt = new Date().toISOString()): ObservedInstance {
  return {
    id,
    state: "Running",
    has_snapshot: false,
    state_error: null,
    exit_code: null,
    exit_message: null,
    started_at: startedAt,
    stopped_at: null,
  };
}
