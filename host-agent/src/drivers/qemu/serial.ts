// Reading the guest's serial log: /init prints one machine-readable line per lifecycle event,
// and a counting guest program one line a second (host-agent/guest/protocol.ts).
import { readFile } from "node:fs/promises";
import { COUNT_MARKER, INIT_MARKER, type InitEvent } from "../../../guest/protocol.ts";

export type { InitEvent };

/** A marker anywhere in a line: the console is shared with the program, the guest agent and the
 * kernel, and another writer's text can land on the marker's line before or after it. */
const INIT_MARK = new RegExp(`${INIT_MARKER} (\\{[^{}]*\\})`, "g");
const COUNT_LINE = new RegExp(`^${COUNT_MARKER} (\\d+)\\s*$`);

/** The init markers in a serial log, in order. Lines that do not parse are not markers. */
export function initEvents(log: string): InitEvent[] {
  const out: InitEvent[] = [];
  for (const line of log.split(/\r?\n/)) {
    for (const m of line.matchAll(INIT_MARK)) {
      try {
        out.push(JSON.parse(m[1] ?? "") as InitEvent);
      } catch {
        // A marker cut short by a kernel message in its middle; not an event.
      }
    }
  }
  return out;
}

/** The counter's values (`OFFSHOOT-COUNT n`) in a serial log, in order. */
export function counts(log: string): number[] {
  const out: number[] = [];
  for (const line of log.split(/\r?\n/)) {
    const m = COUNT_LINE.exec(line);
    if (m?.[1]) out.push(Number(m[1]));
  }
  return out;
}

async function readLog(file: string): Promise<string> {
  try {
    return await readFile(file, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return "";
    throw e;
  }
}

export interface WaitOptions {
  timeoutMs: number;
  /** Stop waiting early (e.g. the QEMU process exited); the promise rejects with the reason. */
  signal?: AbortSignal;
  pollMs?: number;
}

/** Polls the serial log until `found(log)` returns a value other than undefined. */
export async function waitForSerial<T>(
  file: string,
  found: (log: string) => T | undefined,
  opts: WaitOptions,
): Promise<T> {
  const deadline = Date.now() + opts.timeoutMs;
  for (;;) {
    const log = await readLog(file);
    const value = found(log);
    if (value !== undefined) return value;
    opts.signal?.throwIfAborted();
    if (Date.now() >= deadline) {
      const tail = log.split("\n").slice(-5).join("\n");
      throw new Error(
        `serial log ${file}: condition not met within ${opts.timeoutMs} ms; tail:\n${tail}`,
      );
    }
    await new Promise((r) => setTimeout(r, opts.pollMs ?? 100));
  }
}
