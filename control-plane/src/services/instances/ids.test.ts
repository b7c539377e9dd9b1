import { isCuid } from "@paralleldrive/cuid2";
import { describe, expect, it } from "vitest";
import { makeIdsAhead, newInstanceId } from "./ids.ts";

describe("instance ids", () => {
  it("are distinct CUID2s, made on demand and then ahead of time", async () => {
    const before = Array.from({ length: 20 }, newInstanceId);
    makeIdsAhead();
    await new Promise((r) => setTimeout(r, 50)); // the refill runs in idle turns
    const after = Array.from({ length: 20 }, newInstanceId);
    const all = [...before, ...after];
    expect(all.every((id) => isCuid(id) && id.length === 24)).toBe(true);
    expect(new Set(all).size).toBe(all.length);
  });
});
