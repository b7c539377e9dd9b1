// Reading the guest's serial log: /init (scripts/vm-assets.ts) prints one machine-readable line
// per lifecycle event, `OFFSHOOT-INIT {"event":"ready"}` and `OFFSHOOT-INIT
// {"event":"exit","code":N}`, and the default guest program prints `OFFSHOOT-COUNT n` each second.
import { readFile } from "node:fs/promises";

export type InitEvent =
  | { event: "ready" }
  | { event: "exit"; code: number; oom?: boolean }
  | { event: "failed"; message: string }
  | { event: "insmod_failed"; module: string };

const INIT_LINE = /^OFFSHOOT-INIT (\{.*\})\s*$/;
const COUNT_LINE = /^OFFSHOOT-COUNT (\d+)\s*$/;

/** The init markers in a serial log, in order. Lines that do not parse are not markers. */
export function initEvents(log: string): InitEvent[] {
  const out: InitEvent[] = [];
  for (const line of log.split(/\r?\n/)) {
    const m = INIT_LINE.exec(line);
    if (!m?.[1]) continue;
    try {
      out.push(JSON.parse(m[1]) as InitEvent);
    } catch {
      // A marker cut short by a kernel message on the same console line; not an event.
    }
  }
  return out;
}

/** The `OFFSHOOT-COUNT n` values in a serial log, in order. */
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
