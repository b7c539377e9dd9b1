import { AGENT_LIMITS, LogQuery } from "@offshoot/shared";
import { describe, expect, it } from "vitest";
import { LogStreamLine, MAX_LOG_LINE_CHARS } from "./session-protocol.ts";

describe("the HostSession's log stream", () => {
  it("fits the largest chunk an agent may send, every character escaped, in one line", () => {
    const { logChunkChars, logLineChars, logLines } = AGENT_LIMITS;
    const worst = Array.from({ length: logChunkChars / logLineChars }, () =>
      "\u0001".repeat(logLineChars),
    );
    expect(JSON.stringify({ lines: worst }).length).toBeLessThanOrEqual(MAX_LOG_LINE_CHARS);
    const many = Array.from({ length: logLines }, () => "");
    expect(JSON.stringify({ lines: many }).length).toBeLessThanOrEqual(MAX_LOG_LINE_CHARS);
  });

  it("reads lines and the end, and refuses anything else", () => {
    expect(LogStreamLine.parse({ lines: ["a"] })).toEqual({ lines: ["a"] });
    const end = { done: true, error: { code: "host_unavailable", message: "host went away" } };
    expect(LogStreamLine.parse(end)).toEqual(end);
    expect(LogStreamLine.safeParse({ lines: "a" }).success).toBe(false);
    expect(LogStreamLine.safeParse({ done: false }).success).toBe(false);
  });

  it("takes a log query and nothing of a message around it", () => {
    const query = { instance_id: "i1", source: "app", tail: 10, follow: true };
    expect(LogQuery.parse({ ...query, type: "command", stream_id: "s" })).toEqual(query);
    expect(LogQuery.safeParse({ ...query, tail: -1 }).success).toBe(false);
  });
});
