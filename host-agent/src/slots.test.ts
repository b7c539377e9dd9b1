import { describe, expect, it } from "vitest";
import { Slots } from "./slots.ts";

describe("Slots", () => {
  it("holds at most its size at once and serves waiters in arrival order", async () => {
    const slots = new Slots(2);
    const order: number[] = [];
    const gates = Array.from({ length: 5 }, () => {
      let resolve = () => {};
      const promise = new Promise<void>((r) => {
        resolve = r;
      });
      return { promise, resolve };
    });
    let peak = 0;
    const runs = gates.map((g, i) =>
      slots.run(async () => {
        order.push(i);
        peak = Math.max(peak, slots.load.active);
        await g.promise;
      }),
    );
    await Promise.resolve();
    expect(order).toEqual([0, 1]);
    expect(slots.load).toEqual({ active: 2, waiting: 3 });
    gates[1]?.resolve();
    await runs[1];
    expect(order).toEqual([0, 1, 2]);
    for (const g of gates) g.resolve();
    await Promise.all(runs);
    expect(order).toEqual([0, 1, 2, 3, 4]);
    expect(peak).toBe(2);
    expect(slots.load).toEqual({ active: 0, waiting: 0 });
  });

  it("frees the slot when the holder fails", async () => {
    const slots = new Slots(1);
    await expect(slots.run(async () => Promise.reject(new Error("boom")))).rejects.toThrow("boom");
    expect(await slots.run(async () => 7)).toBe(7);
    expect(slots.load.active).toBe(0);
  });
});
