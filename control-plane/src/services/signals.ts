import type { Bus } from "./bus.ts";

/** Topics are ids with a short prefix: 100 of them stay well under a NOTIFY's 8000 bytes. */
const TOPICS_PER_MESSAGE = 100;

/** How often a waiter re-checks the database when nothing woke it, by default. */
const DEFAULT_POLL_MS = 1000;

/**
 * Wake-ups: "operation X finished", "instance Y changed". A waiter re-checks the database when
 * woken, and also on a slow timer (`pollMs`), so a missed signal delays it but never loses the
 * answer. With a bus, a wake-up reaches waiters in every replica (a request waiting on replica B
 * for a result that the host's agent delivered to replica A); when the bus had to listen anew
 * (its connection was lost, and NOTIFYs with it) every waiter re-checks at once (wakeAll).
 */
export class Signals {
  private waiters = new Map<string, Set<() => void>>();

  /** Topics notified in this turn of the event loop, for the other replicas. */
  private outgoing: string[] = [];

  constructor(
    private bus?: Bus,
    private readonly pollMs = DEFAULT_POLL_MS,
  ) {
    bus?.subscribe((msg) => {
      if (msg.t === "signal") for (const topic of msg.topics) this.wake(topic);
      if (msg.t === "resync") this.wakeAll();
    });
  }

  notify(topic: string): void {
    this.wake(topic);
    if (!this.bus) return;
    // One bus message for everything notified together (a result wakes its operation and
    // every instance it touched): one NOTIFY instead of one per topic.
    if (this.outgoing.push(topic) === 1) queueMicrotask(() => this.publish());
  }

  /** Every waiter re-checks now. */
  wakeAll(): void {
    for (const topic of [...this.waiters.keys()]) this.wake(topic);
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

  /** Calls `check` until it returns a value, `timeoutMs` passes or `signal` aborts (then
   * returns undefined). With `woken`, the first check waits for a wake-up (or the poll): for a
   * caller that knows the answer cannot be there yet. */
  async until<T>(
    topic: string,
    timeoutMs: number,
    check: () => Promise<T | undefined>,
    opts: { pollMs?: number; woken?: boolean; signal?: AbortSignal } = {},
  ): Promise<T | undefined> {
    const { pollMs = this.pollMs, signal } = opts;
    let skip = opts.woken ?? false;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (signal?.aborted) return undefined;
      let wake: () => void = () => {};
      const woken = new Promise<void>((resolve) => {
        wake = resolve;
      });
      this.add(topic, wake);
      signal?.addEventListener("abort", wake);
      try {
        const value = skip ? undefined : await check();
        skip = false;
        if (value !== undefined) return value;
        const left = deadline - Date.now();
        if (left <= 0 || signal?.aborted) return undefined;
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([
          woken,
          new Promise<void>((r) => {
            timer = setTimeout(r, Math.min(left, pollMs));
          }),
        ]);
        clearTimeout(timer);
      } finally {
        signal?.removeEventListener("abort", wake);
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
