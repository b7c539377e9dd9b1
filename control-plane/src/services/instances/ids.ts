import { createId } from "@paralleldrive/cuid2";

// A CUID2 costs about a quarter of a millisecond of CPU (a SHA3-512 and a base-36 conversion),
// spent inside the transaction that creates the instance. In a long-running process a few are
// made ahead, one per turn of the event loop, and taken from here. (Not on Workers, where
// nothing should run after a request.)
export const IDS_AHEAD = 8;
const ready: string[] = [];
let refilling = false;
let ahead = false;

/** Makes ids ahead of time from now on (the Node server calls this). */
export function makeIdsAhead(): void {
  ahead = true;
  refill();
}

function refill(): void {
  if (refilling || !ahead) return;
  refilling = true;
  const one = () => {
    ready.push(createId());
    if (ready.length < IDS_AHEAD) setImmediate(one);
    else refilling = false;
  };
  setImmediate(one);
}

/** A new instance id: a CUID2, made ahead of time when the process had a moment. */
export function newInstanceId(): string {
  const id = ready.pop() ?? createId();
  if (ready.length < IDS_AHEAD) refill();
  return id;
}

/** How many ids are made ahead and waiting (for tests). */
export function idsWaiting(): number {
  return ready.length;
}
