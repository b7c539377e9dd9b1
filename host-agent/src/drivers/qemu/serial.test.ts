import { describe, expect, it } from "vitest";
import { initEvents } from "./serial.ts";

describe("initEvents", () => {
  it("finds /init's markers, also where another writer's text shares their line", () => {
    const log = [
      "[    3.1] EXT4-fs (vdb): mounted filesystem",
      'OFFSHOOT-INIT {"event":"ready"}',
      'OFFSHOOT-COUNT 0OFFSHOOT-INIT {"event":"exit","code":3}',
      'OFFSHOOT-INIT {"event":"insmod_failed","module":"x"}[    4.2] reboot: Power down',
      "OFFSHOOT-COUNT 1",
    ].join("\n");
    expect(initEvents(log)).toEqual([
      { event: "ready" },
      { event: "exit", code: 3 },
      { event: "insmod_failed", module: "x" },
    ]);
  });

  it("takes no event from a marker a kernel message cut in its middle", () => {
    expect(initEvents('OFFSHOOT-INIT {"event":"re[  5.0] random: crng init done\nady"}')).toEqual(
      [],
    );
  });
});
