import { describe, expect, it } from "vitest";
import { AGENT_LIMITS, AgentMessage, CommandError } from "./protocol.ts";

describe("CommandError", () => {
  it("keeps a code of the API's table", () => {
    expect(CommandError.parse({ code: "interrupted", message: "agent restarted" })).toEqual({
      code: "interrupted",
      message: "agent restarted",
    });
  });

  it("reads a code it does not know as internal_error, naming the code", () => {
    expect(CommandError.parse({ code: "disk_on_fire", message: "smoke" })).toEqual({
      code: "internal_error",
      message: "disk_on_fire: smoke",
    });
  });

  it("keeps that message within the text bound", () => {
    const message = "m".repeat(AGENT_LIMITS.textChars);
    const read = CommandError.parse({ code: "disk_on_fire", message });
    expect(read.message).toHaveLength(AGENT_LIMITS.textChars);
    expect(read.message.startsWith("disk_on_fire: mmm")).toBe(true);
  });

  it("does so inside an agent's result", () => {
    const msg = AgentMessage.parse({
      v: 1,
      type: "result",
      command_id: "c1",
      ok: false,
      error: { code: "disk_on_fire", message: "smoke" },
      instances: [],
    });
    expect(msg.type === "result" && !msg.ok && msg.error).toEqual({
      code: "internal_error",
      message: "disk_on_fire: smoke",
    });
  });
});
