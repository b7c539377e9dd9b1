import { isCuid } from "@paralleldrive/cuid2";
import { describe, expect, it } from "vitest";
import { IDS_AHEAD, idsWaiting, makeIdsAhead, newInstanceId } from "./ids.ts";

describe("instance ids", () => {
  it("are distinct CUID2s, made on demand and then ahead of time", async () => {
    const before = Array.from({ length: 20 }, newInstanceId);
    expect(idsWaiting()).toBe(0); // none are made ahead until the server asks for it
    makeIdsAhead();
    // The refill runs in idle turns of the event loop.
    await expect.poll(idsWaiting, { timeout: 10_000 }).toBe(IDS_AHEAD);
    const after = Array.from({ length: 20 }, newInstanceId);
    expect(idsWaiting()).toBe(0); // the first ones came from the refill, the rest on demand
    await expect.poll(idsWaiting, { timeout: 10_000 }).toBe(IDS_AHEAD);
    const all = [...before, ...after];
    expect(all.every((id) => isCuid(id) && id.length === 24)).toBe(true);
    expect(new Set(all).size).toBe(all.length);
  });
});
