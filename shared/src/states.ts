import type { InstanceState } from "./schemas.ts";

// Which state a lifecycle verb needs, and where each state may go. Unknown allows only delete,
// as in Hypeman: nothing else is safe while the host's view is missing.
export const TRANSITIONS: Record<InstanceState, readonly InstanceState[]> = {
  Created: ["Initializing", "Running", "Stopped", "Unknown"],
  Initializing: ["Running", "Stopped", "Standby", "Unknown"],
  Running: ["Stopped", "Standby", "Paused", "Shutdown", "Unknown"],
  Paused: ["Running", "Standby", "Stopped", "Unknown"],
  Shutdown: ["Stopped", "Running", "Unknown"],
  Stopped: ["Initializing", "Running", "Unknown"],
  Standby: ["Initializing", "Running", "Stopped", "Unknown"],
  Unknown: ["Created", "Initializing", "Running", "Paused", "Shutdown", "Stopped", "Standby"],
};

export function canTransition(from: InstanceState, to: InstanceState): boolean {
  return TRANSITIONS[from].includes(to);
}

/** The states a verb may start from. */
export const VERB_FROM: Record<"start" | "stop" | "standby" | "restore", readonly InstanceState[]> =
  {
    start: ["Stopped"],
    stop: ["Running", "Initializing", "Paused", "Shutdown"],
    standby: ["Running"],
    restore: ["Standby"],
  };

/** Fork sources: Stopped and Standby directly; Running only with from_running. */
export const FORKABLE: readonly InstanceState[] = ["Stopped", "Standby", "Running"];

/** States in which an instance holds memory and vCPUs on its host. */
export const RESIDENT: readonly InstanceState[] = [
  "Created",
  "Initializing",
  "Running",
  "Paused",
  "Shutdown",
  "Unknown",
];
