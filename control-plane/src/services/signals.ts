import type { Bus } from "./bus.ts";

/** Topics are ids with a short prefix: 100 of them stay well under a NOTIFY's 8000 bytes. */
const TOPICS_PER_MESSAGE = 100;

/**
 * Wake-ups: "operation X finished", "instance Y changed". A waiter re-checks the database when
 * woken, and also on a slow timer, so a missed signal delays it but never loses the answer.
 * With a bus, a wake-up reaches waiters in every replica (a request waiting on replica B for a
 * result that the host's agent delivered to replica A).
 */
export class Signals {
  private waiters = new Map<string, Set<() => void>>();

  /** Topics notified in this turn of the event loop, for the other replicas. */
  private outgoing: string[] = [];

  constructor(private bus?: Bus) {
    bus?.subscribe((msg) => {
      if (msg.t === "signal") for (const topic of msg.topics) this.wake(topic);
    });
  }

  notify(topic: string): void {
    this.wake(topic);
    if (!this.bus) return;
    // One bus message for everything notified together (a result wakes its operation and
    // every instance it touched): one NOTIFY instead of one per topic.
    if (this.outgoing.push(topic) === 1) queueMicrotask(() => this.publish());
  }

  private publish(): void {
    const topics = this.outgoing;
    this.outgoing = [];
    for (let i = 0; i < topics.length; i += TOPICS_PER_MESSAGE) {
      this.bus?.publish({ t: "signal", topics: topics.slice(i, i + TOPICS_PER_MESSAGE) });
    }
  }

  private wake(topic: string): void {
    const set = this.waiters.get(topic);
    if (!set) return;
    this.waiters.delete(topic);
    for (const wake of set) wake();
  }

  /** Calls `check` until it returns a value or `timeoutMs` passes (then returns undefined).
   * With `woken`, the first check waits for a wake-up (or the poll): for a caller that knows
   * the answer cannot be there yet. */
  async until<T>(
    topic: string,
    timeoutMs: number,
    check: () => Promise<T | undefined>,
    opts: { pollMs?: number; woken?: boolean } = {},
  ): Promise<T | undefined> {
    const { pollMs = 1000 } = opts;
    let skip = opts.woken ?? false;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      let wake: () => void = () => {};
      const woken = new Promise<void>((resolve) => {
        wake = resolve;
      });
      this.add(topic, wake);
      try {
        const value = skip ? undefined : await check();
        skip = false;
        if (value !== undefined) return value;
        const left = deadline - Date.now();
        if (left <= 0) return undefined;
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([
          woken,
          new Promise<void>((r) => {
            timer = setTimeout(r, Math.min(left, pollMs));
          }),
        ]);
        clearTimeout(timer);
      } finally {
        this.remove(topic, wake);
      }
    }
  }

  private add(topic: string, wake: () => void) {
    let set = this.waiters.get(topic);
    if (!set) {
      set = new Set();
      this.waiters.set(topic, set);
    }
    set.add(wake);
  }

  private remove(topic: string, wake: () => void) {
    const set = this.waiters.get(topic);
    if (!set) return;
    set.delete(wake);
    if (set.size === 0) this.waiters.delete(topic);
  }
}
