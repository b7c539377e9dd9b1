// Operations on one instance run one at a time, in arrival order; a fork holds its source and
// its target. Each operation queues behind the latest holder of every id it needs, all in the
// same tick, so waits only ever point at earlier operations and cannot deadlock.
export class InstanceLocks {
  private readonly tails = new Map<string, Promise<void>>();

  async run<T>(ids: readonly string[], fn: () => Promise<T>): Promise<T> {
    const keys = [...new Set(ids)];
    let release = () => {};
    const held = new Promise<void>((resolve) => {
      release = resolve;
    });
    const before = keys.map((k) => this.tails.get(k));
    for (const k of keys) this.tails.set(k, held);
    try {
      await Promise.all(before);
      return await fn();
    } finally {
      release();
      for (const k of keys) if (this.tails.get(k) === held) this.tails.delete(k);
    }
  }

  /** Ids currently held or awaited; for tests. */
  get size(): number {
    return this.tails.size;
  }
}
