import type { Bus } from "./bus.ts";

/**
 * Wake-ups: "operation X finished", "instance Y changed". A waiter re-checks the database when
 * woken, and also on a slow timer, so a missed signal delays it but never loses the answer.
 * With a bus, a wake-up reaches waiters in every replica (a request waiting on replica B for a
 * result that the host's agent delivered to replica A).
 */
export class Signals {
  private waiters = new Map<string, Set<() => void>>();

  constructor(private bus?: Bus) {
    bus?.subscribe((msg) => {
      if (msg.t === "signal") this.wake(msg.topic);
    });
  }

  notify(topic: string): void {
    this.wake(topic);
    this.bus?.publish({ t: "signal", topic });
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
