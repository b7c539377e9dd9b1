import { describe, expect, it } from "vitest";
import type { Bus, BusMessage } from "./bus.ts";
import { Signals } from "./signals.ts";

/** A bus that records what is published and delivers what the test sends. */
function fakeBus() {
  const published: BusMessage[] = [];
  const handlers: Array<(msg: BusMessage) => void> = [];
  const bus: Bus = {
    replica: "me",
    publish: (msg) => published.push(msg),
    subscribe: (h) => {
      handlers.push(h);
    },
  };
  const deliver = (msg: BusMessage) => {
    for (const h of handlers) h(msg);
  };
  return { bus, published, deliver };
}

describe("signals", () => {
  it("publishes everything notified in one turn as one message", async () => {
    const { bus, published } = fakeBus();
    const signals = new Signals(bus);
    signals.notify("op:1");
    signals.notify("instance:a");
    signals.notify("instance:b");
    expect(published).toEqual([]); // not before the turn ends
    await Promise.resolve();
    expect(published).toEqual([{ t: "signal", topics: ["op:1", "instance:a", "instance:b"] }]);
    for (let i = 0; i < 250; i++) signals.notify(`instance:${i}`);
    await Promise.resolve();
    expect(published.slice(1).map((m) => (m.t === "signal" ? m.topics.length : 0))).toEqual([
      100, 100, 50,
    ]);
  });

  it("wakes local waiters at once and remote ones through the bus", async () => {
    const { bus, deliver } = fakeBus();
    const signals = new Signals(bus);
    let answer: string | undefined;
    const local = signals.until("op:1", 10_000, async () => answer, { woken: true });
    const remote = signals.until("op:2", 10_000, async () => answer, { woken: true });
    answer = "done";
    signals.notify("op:1");
    expect(await local).toBe("done");
    deliver({ t: "signal", topics: ["instance:x", "op:2"] });
    expect(await remote).toBe("done");
  });
});
