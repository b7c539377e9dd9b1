// The agent's own record of what it did to each instance: log source "hypeman". A line per
// instance an operation touches when it starts and when it ends. Written in order but off the
// command's path: a command never waits for it, and a reader waits for what is queued.
import { appendFile, mkdir, rm } from "node:fs/promises";
import { dirname } from "node:path";
import type { Operation } from "@offshoot/shared";
import { errorMessage, type Logger } from "./log.ts";
import { instanceIds } from "./operations/index.ts";

export class OperationsLog {
  private queue: Promise<void> = Promise.resolve();

  constructor(
    private readonly file: (instanceId: string) => string,
    private readonly log: Logger,
  ) {}

  /** Queues a line for each instance `op` touches; a successful delete removes the log
   * instead. Never fails: a line that cannot be written is reported and dropped. */
  note(op: Operation, text: string): void {
    const line = `${new Date().toISOString()} ${text}\n`;
    const gone = op.kind === "delete" && text.endsWith(" ok");
    const ids = instanceIds(op);
    this.queue = this.queue.then(async () => {
      await Promise.all(ids.map((id) => this.write(id, gone ? undefined : line)));
    });
  }

  /** Resolves once every line queued so far is written. */
  settled(): Promise<void> {
    return this.queue;
  }

  private async write(id: string, line: string | undefined): Promise<void> {
    const file = this.file(id);
    try {
      if (line === undefined) {
        await rm(file, { force: true });
        return;
      }
      // The directory exists after the first line: made only when an append finds it missing.
      await appendFile(file, line).catch(async (e: unknown) => {
        if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
        await mkdir(dirname(file), { recursive: true });
        await appendFile(file, line);
      });
    } catch (err) {
      this.log("warn", "operations log write failed", {
        instance_id: id,
        error: errorMessage(err),
      });
    }
  }
}
