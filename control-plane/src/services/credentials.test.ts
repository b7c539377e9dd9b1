import { describe, expect, it } from "vitest";
import { bearerToken } from "./credentials.ts";

describe("bearerToken", () => {
  it("takes the token of a Bearer header, the scheme in any case, trailing whitespace tolerated", () => {
    expect(bearerToken("Bearer osk_abc")).toBe("osk_abc");
    expect(bearerToken("bearer  osk_abc")).toBe("osk_abc");
    expect(bearerToken("BEARER\tosk_abc \t")).toBe("osk_abc");
  });

  it("refuses anything else", () => {
    expect(bearerToken(undefined)).toBeUndefined();
    expect(bearerToken("")).toBeUndefined();
    expect(bearerToken("Bearer")).toBeUndefined();
    expect(bearerToken("Bearer ")).toBeUndefined();
    expect(bearerToken("Basic osk_abc")).toBeUndefined();
    expect(bearerToken("Bearer osk_abc extra")).toBeUndefined();
    expect(bearerToken(" Bearer osk_abc")).toBeUndefined();
  });
});
