// Agent messages are recorded one at a time, in arrival order (a hello's reconciliation before
// any result that follows it). A message that cannot be recorded ends the connection with
// `resync`: the agent reconnects and says hello, and the re-send recovers what was lost.
import { CLOSE } from "@offshoot/shared";
import { retryWhileDatabaseAway } from "../../db/client.ts";
import type { Log } from "../../log.ts";
import type { AgentLink } from "./index.ts";

/** How long a message is tried again while the database is away before the agent is asked to
 * reconnect (and say hello, which re-sends what is pending). */
export const DATABASE_RETRY_MS = 30_000;
/** Messages waiting to be recorded, at most, per connection (while the database is away). */
export const MAX_QUEUED = 1000;

export class AgentMessageQueue {
  private tail: Promise<void> = Promise.resolve();
  private waiting = 0;

  constructor(
    private log: Log,
    private opts: {
      /** 0: a message is tried once. */
      retryMs: number;
      maxQueued: number;
      /** Stop trying again (the socket is gone). */
      stop?: () => boolean;
    },
  ) {}

  /** Runs `handle` after every message queued before it. Resolves when it is done, whether it
   * was recorded or the connection was closed for it; never rejects. */
  push(link: Pick<AgentLink, "close"> & { hostId?: string }, handle: () => Promise<void>) {
    if (this.waiting >= this.opts.maxQueued) {
      link.close(CLOSE.resync, "too many messages waiting to be recorded; reconnect");
      return this.tail;
    }
    this.waiting++;
    this.tail = this.tail
      // While the database is away a message is tried again (each one is idempotent to record)
      // rather than the agent sent away to reconnect: every agent of the fleet would, at once.
      .then(() =>
        retryWhileDatabaseAway(handle, { maxMs: this.opts.retryMs, stop: this.opts.stop }),
      )
      .catch((e: unknown) => {
        // Dropping a result or a hello would leave commands pending until the next reconnect;
        // forcing that reconnect now makes the agent say hello and the re-send recover it.
        this.log("error", "agent message failed; asking the agent to reconnect", {
          ...(link.hostId !== undefined && { host_id: link.hostId }),
          error: String(e),
        });
        link.close(CLOSE.resync, "message could not be recorded; reconnect");
      })
      .finally(() => {
        this.waiting--;
      });
    return this.tail;
  }

  /** Resolves once every message queued so far has been handled. */
  drained(): Promise<void> {
    return this.tail;
  }
}
