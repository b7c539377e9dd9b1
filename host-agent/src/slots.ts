// A counting semaphore: at most `size` holders at once, the rest served in arrival order. Pulls
// and guest launches use it so a burst queues instead of overloading the host.
export class Slots {
  private active = 0;
  private readonly waiting: Array<() => void> = [];

  constructor(readonly size: number) {
    if (!Number.isInteger(size) || size < 1) throw new Error(`slots: bad size ${size}`);
  }

  /** Runs `fn` in a slot, waiting for one first. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.size) {
      await new Promise<void>((resolve) => this.waiting.push(resolve));
    } else this.active++;
    try {
      return await fn();
    } finally {
      // The slot passes straight to the next waiter, so none can be overtaken.
      const next = this.waiting.shift();
      if (next) next();
      else this.active--;
    }
  }

  /** Holders and waiters now (for tests). */
  get load(): { active: number; waiting: number } {
    return { active: this.active, waiting: this.waiting.length };
  }
}
