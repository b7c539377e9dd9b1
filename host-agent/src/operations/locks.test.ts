import { describe, expect, it } from "vitest";
import { InstanceLocks } from "./locks.ts";

const tick = () => new Promise((r) => setTimeout(r, 5));

describe("InstanceLocks", () => {
  it("serializes operations sharing an id and runs disjoint ones concurrently", async () => {
    const locks = new InstanceLocks();
    const log: string[] = [];
    const op = (name: string, ids: string[]) =>
      locks.run(ids, async () => {
        log.push(`${name}:start`);
        await tick();
        log.push(`${name}:end`);
      });
    await Promise.all([op("a", ["x"]), op("fork", ["x", "y"]), op("b", ["y"]), op("c", ["z"])]);
    // fork waits for a (x); b waits for fork (y); c shares nothing and starts at once.
    expect(log.indexOf("fork:start")).toBeGreaterThan(log.indexOf("a:end"));
    expect(log.indexOf("b:start")).toBeGreaterThan(log.indexOf("fork:end"));
    expect(log.indexOf("c:start")).toBeLessThan(log.indexOf("a:end"));
    expect(locks.size).toBe(0);
  });

  it("releases the lock when an operation throws", async () => {
    const locks = new InstanceLocks();
    await expect(locks.run(["x"], async () => Promise.reject(new Error("boom")))).rejects.toThrow(
      "boom",
    );
    expect(await locks.run(["x"], async () => "next")).toBe("next");
  });
});
