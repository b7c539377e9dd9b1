import type { InstanceState } from "./schemas.ts";

// The transition table of the lifecycle verbs: which states each verb may start from. Unknown
// is in no list, so it allows only delete, as in Hypeman: nothing else is safe while the
// host's view is missing. Where an instance goes is what its host then reports.
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
