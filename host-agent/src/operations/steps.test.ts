import { describe, expect, it } from "vitest";
import { recordingContext } from "../../testing/index.ts";
import { runSteps, type Step, UndoError } from "./steps.ts";

function tracked(log: string[], name: string, fail?: "run" | "undo"): Step {
  return {
    name,
    run: async () => {
      if (fail === "run") throw new Error(`${name} failed`);
      log.push(`run ${name}`);
    },
    undo: async () => {
      if (fail === "undo") throw new Error(`undo ${name} failed`);
      log.push(`undo ${name}`);
    },
  };
}

describe("runSteps", () => {
  it("records each step once it completes", async () => {
    const log: string[] = [];
    const ctx = recordingContext("c1");
    await runSteps(ctx.steps, [tracked(log, "a"), tracked(log, "b")]);
    expect(ctx.recorded).toEqual(["a", "b"]);
    expect(log).toEqual(["run a", "run b"]);
  });

  it("undoes completed steps in reverse and rethrows the original error", async () => {
    const log: string[] = [];
    const ctx = recordingContext("c1");
    const steps = [
      tracked(log, "a"),
      tracked(log, "b"),
      tracked(log, "c", "run"),
      tracked(log, "d"),
    ];
    await expect(runSteps(ctx.steps, steps)).rejects.toThrow("c failed");
    expect(log).toEqual(["run a", "run b", "undo b", "undo a"]);
    expect(ctx.recorded).toEqual(["a", "b"]);
  });

  it("keeps undoing past a failed undo and reports both", async () => {
    const log: string[] = [];
    const steps = [tracked(log, "a"), tracked(log, "b", "undo"), tracked(log, "c", "run")];
    const err = await runSteps(recordingContext("c1").steps, steps).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UndoError);
    expect((err as Error).message).toMatch(/c failed; undo failed \(b: undo b failed\)/);
    expect(log).toEqual(["run a", "run b", "undo a"]);
  });

  it("undoes a step whose journal record could not be written", async () => {
    const log: string[] = [];
    const recorder = { record: async () => Promise.reject(new Error("disk full")) };
    await expect(runSteps(recorder, [tracked(log, "a"), tracked(log, "b")])).rejects.toThrow(
      "disk full",
    );
    expect(log).toEqual(["run a", "undo a"]);
  });
});
