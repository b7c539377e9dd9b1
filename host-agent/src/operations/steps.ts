// Multi-step operations with undo, as firecracker-go-sdk names its start steps: each completed
// step is journaled before the next begins; a failure undoes the completed ones in reverse, so
// a failed operation leaves the host as it found it.
import type { StepRecorder } from "../drivers/driver.ts";

export interface Step {
  readonly name: string;
  run(): Promise<void>;
  /** Omitted when a later step's undo already covers this one (e.g. files inside a removed dir). */
  undo?(): Promise<void>;
}

export class UndoError extends Error {
  constructor(
    readonly cause: unknown,
    readonly failures: ReadonlyArray<{ step: string; error: unknown }>,
  ) {
    const what = failures.map((f) => `${f.step}: ${message(f.error)}`).join("; ");
    super(`${message(cause)}; undo failed (${what})`);
    this.name = "UndoError";
  }
}

function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

export async function runSteps(recorder: StepRecorder, steps: readonly Step[]): Promise<void> {
  const done: Step[] = [];
  try {
    for (const step of steps) {
      await step.run();
      done.push(step);
      await recorder.record(step.name);
    }
  } catch (err) {
    const failures: Array<{ step: string; error: unknown }> = [];
    for (const step of done.reverse()) {
      try {
        await step.undo?.();
      } catch (error) {
        failures.push({ step: step.name, error });
      }
    }
    // The original error keeps its code unless undo left something behind, which needs a human.
    throw failures.length ? new UndoError(err, failures) : err;
  }
}
