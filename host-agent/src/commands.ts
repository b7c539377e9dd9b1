// Commands from the control plane: journaled, executed at most once, answered from the
// journal when re-sent. A reconnect never loses a result: the control plane re-sends what it
// has not heard back about, and the journal answers.
import { setTimeout as sleep } from "node:timers/promises";
import {
  type Command,
  ErrorCode,
  isHostOperation,
  PROTOCOL_VERSION,
  type Result,
} from "@offshoot/shared";
import type { Driver, OpContext } from "./drivers/driver.ts";
import type { Journal, Outcome } from "./journal.ts";
import { errorMessage, type Logger } from "./log.ts";
import type { HostOps } from "./operations/host-ops.ts";
import { withoutSecrets } from "./operations/image-pull.ts";
import { execute, instanceIds, observe, toCommandError } from "./operations/index.ts";
import { InstanceLocks } from "./operations/locks.ts";
import type { OperationsLog } from "./operations-log.ts";

/** The code of a command a crash cut short: only the agent reports it (see recover). */
export const INTERRUPTED = ErrorCode.enum.interrupted;

export type Disposition = "replayed" | "in_flight" | "started" | "refused";

export function toResult(commandId: string, outcome: Outcome, replayed: boolean): Result {
  return { v: PROTOCOL_VERSION, type: "result", command_id: commandId, ...outcome, replayed };
}

export class Commands {
  private readonly running = new Map<string, Promise<void>>();
  private readonly locks = new InstanceLocks();
  private accepting = true;

  constructor(
    private readonly journal: Journal,
    private readonly driver: Driver,
    private readonly log: Logger,
    private readonly onResult: (result: Result) => void,
    /** Where each instance's operations are noted (log source "hypeman"); none if absent. */
    private readonly operationsLog?: OperationsLog,
    /** Runs the host's own commands (image_pull, volume_*); absent: they fail. */
    private readonly hostOps?: HostOps,
  ) {}

  /** Ids of commands executing now, for hello's in_flight. */
  inFlight(): string[] {
    return [...this.running.keys()];
  }

  handle(command: Command): Disposition {
    const entry = this.journal.get(command.id);
    if (entry?.result) {
      this.log("info", "command replayed", { command_id: command.id, kind: command.op.kind });
      this.onResult(toResult(command.id, entry.result, true));
      return "replayed";
    }
    // Its result goes out on whatever connection is up when it finishes.
    if (this.running.has(command.id)) return "in_flight";
    if (!this.accepting) return "refused";
    // Started in an earlier life and not settled: cannot happen once recover() has run.
    if (entry) return "in_flight";
    this.running.set(command.id, this.run(command));
    return "started";
  }

  /** Before connecting: settles every command a crash cut short. Deletes are re-run (they are
   * idempotent); anything else is rolled back by the driver and answered `interrupted`, so an
   * interrupted fork is never half-done and never done twice. */
  async recover(): Promise<void> {
    for (const { id, command, steps } of this.journal.unfinished()) {
      const { op } = command;
      let outcome: Outcome;
      if (op.kind === "delete") {
        outcome = await execute(this.driver, this.locks, op, this.context(id));
      } else if (
        op.kind === "volume_create" ||
        op.kind === "volume_delete" ||
        op.kind === "snapshot_delete" ||
        op.kind === "snapshot_compress"
      ) {
        // Idempotent, like delete: run again.
        outcome = this.hostOps
          ? await this.hostOps.run(id, op)
          : { ok: false, error: { code: INTERRUPTED, message: "agent restarted" }, instances: [] };
      } else if (op.kind === "image_pull") {
        // Nothing to undo: a layer or rootfs is kept only once whole. Asked again, it resumes.
        const message = "agent restarted while pulling the image; pull it again";
        outcome = { ok: false, error: { code: INTERRUPTED, message }, instances: [] };
      } else {
        const undone = op.kind === "create" || op.kind === "fork" || op.kind === "snapshot_create";
        const what = `agent restarted while ${op.kind} was in progress`;
        try {
          const instances = await this.driver.rollback(op, { commandId: id, steps });
          const message = undone
            ? `${what}; rolled back`
            : `${what}; reporting the state observed now`;
          outcome = { ok: false, error: { code: INTERRUPTED, message }, instances };
        } catch (err) {
          const message = `${what}; rollback failed: ${errorMessage(err)}`;
          const instances = await observe(this.driver, instanceIds(op));
          outcome = { ok: false, error: { code: INTERRUPTED, message }, instances };
        }
      }
      await this.journal.finish(id, outcome);
      this.log("warn", "recovered interrupted command", {
        command_id: id,
        kind: op.kind,
        steps,
        ok: outcome.ok,
        ...(outcome.ok ? {} : { error: outcome.error.message }),
      });
    }
  }

  /** Stops taking new commands and waits (bounded) for the ones running to be journaled and
   * their operations-log lines written. */
  async drain(timeoutMs: number): Promise<void> {
    this.accepting = false;
    const timeout = sleep(timeoutMs, "timeout" as const);
    const settled = Promise.all(this.running.values()).then(() => this.operationsLog?.settled());
    const result = await Promise.race([settled, timeout]);
    if (result === "timeout") {
      this.log("warn", "shutting down with commands still running", { in_flight: this.inFlight() });
    }
  }

  private context(id: string): OpContext {
    return { commandId: id, steps: { record: (step) => this.journal.step(id, step) } };
  }

  private async run(command: Command): Promise<void> {
    const { id, op } = command;
    const startedAt = performance.now();
    this.log("info", "command started", { command_id: id, kind: op.kind });
    let outcome: Outcome;
    try {
      await this.journal.begin(withoutSecrets(command));
      this.operationsLog?.note(op, `${op.kind} started (command ${id})`);
      if (isHostOperation(op)) {
        outcome = this.hostOps
          ? await this.hostOps.run(id, op)
          : {
              ok: false,
              error: { code: "not_supported", message: `this agent runs no ${op.kind}` },
              instances: [],
            };
      } else {
        outcome = await execute(this.driver, this.locks, op, this.context(id));
      }
    } catch (err) {
      // Operations turn their own failures into outcomes; this is the journal failing, before
      // anything ran.
      outcome = { ok: false, error: toCommandError(err), instances: [] };
    }
    try {
      await this.journal.finish(id, outcome);
    } catch (err) {
      // Still answered now; after a restart recovery settles it from the steps on disk.
      this.log("error", "journal write failed", { command_id: id, error: errorMessage(err) });
    }
    this.operationsLog?.note(
      op,
      outcome.ok
        ? `${op.kind} ok`
        : `${op.kind} failed: ${outcome.error.code}: ${outcome.error.message}`,
    );
    this.running.delete(id);
    this.log(outcome.ok ? "info" : "warn", "command finished", {
      command_id: id,
      kind: op.kind,
      ok: outcome.ok,
      ...(outcome.ok ? {} : { code: outcome.error.code, error: outcome.error.message }),
      ms: Math.round((performance.now() - startedAt) * 100) / 100,
    });
    this.onResult(toResult(id, outcome, false));
  }
}
