// Log streams the control plane asks for: the last `tail` lines of a log file and, with
// `follow`, the lines appended after, until the control plane cancels or the file goes away
// (the instance was deleted). Files are read by offset, so a follower never re-reads a log.
import { open, stat } from "node:fs/promises";
import type { LogChunk, LogsRequest } from "@offshoot/shared";
import { PROTOCOL_VERSION } from "@offshoot/shared";
import type { Driver } from "./drivers/driver.ts";
import type { OperationsLog } from "./operations-log.ts";
import type { AgentPaths } from "./paths.ts";

const FOLLOW_POLL_MS = 200;
const MAX_LINES_PER_CHUNK = 500;
/** How far back from the end `tail` reads at most: long lines beyond it are not worth it. */
const TAIL_WINDOW_BYTES = 4 * 1024 * 1024;

type Send = (chunk: LogChunk) => void;

export class LogStreams {
  private streams = new Map<string, { cancelled: boolean }>();

  constructor(
    private driver: Driver,
    private paths: AgentPaths,
    private operationsLog?: OperationsLog,
  ) {}

  /** Which file holds a log; undefined when there is none for this instance. */
  fileFor(instanceId: string, source: LogsRequest["source"]): string | undefined {
    return source === "hypeman"
      ? this.paths.operationsLog(instanceId)
      : this.driver.logFile(instanceId, source);
  }

  open(req: LogsRequest, send: Send): void {
    const state = { cancelled: false };
    this.streams.set(req.stream_id, state);
    const chunk = (lines: string[], end?: Pick<LogChunk, "done" | "error">): LogChunk => ({
      v: PROTOCOL_VERSION,
      type: "log",
      stream_id: req.stream_id,
      lines,
      ...end,
    });
    this.run(req, state, (lines) => send(chunk(lines)))
      .then(() => send(chunk([], { done: true })))
      .catch((e: unknown) =>
        send(chunk([], { done: true, error: { code: "internal_error", message: String(e) } })),
      )
      .finally(() => this.streams.delete(req.stream_id));
  }

  cancel(streamId: string): void {
    const s = this.streams.get(streamId);
    if (s) s.cancelled = true;
  }

  /** The connection is gone: every stream it carried ends. */
  cancelAll(): void {
    for (const s of this.streams.values()) s.cancelled = true;
  }

  private async run(
    req: LogsRequest,
    state: { cancelled: boolean },
    emit: (lines: string[]) => void,
  ): Promise<void> {
    if ((await this.driver.get(req.instance_id)) === null) return;
    const file = this.fileFor(req.instance_id, req.source);
    if (!file) return;
    // Lines of operations that finished before this request are on disk before it is read.
    if (req.source === "hypeman") await this.operationsLog?.settled();
    let offset = await tail(file, req.tail, emit);
    let partial = "";
    while (req.follow && !state.cancelled) {
      await new Promise((r) => setTimeout(r, FOLLOW_POLL_MS));
      const size = await stat(file).then(
        (st) => st.size,
        () => -1,
      );
      if (size < 0) {
        // No log file: deleted with its instance, or not written yet.
        if ((await this.driver.get(req.instance_id)) === null) return;
        continue;
      }
      if (size < offset) offset = 0; // truncated or replaced: start over
      if (size === offset) continue;
      const text = partial + (await readRange(file, offset, size));
      offset = size;
      const lines = splitLines(text);
      partial = lines.pop() ?? "";
      for (let i = 0; i < lines.length; i += MAX_LINES_PER_CHUNK) {
        emit(lines.slice(i, i + MAX_LINES_PER_CHUNK));
      }
    }
  }
}

/** Serial consoles end lines with CRLF; a line is sent without its terminator. */
const splitLines = (text: string) => text.split("\n").map((l) => l.replace(/\r$/, ""));

async function readRange(file: string, start: number, end: number): Promise<string> {
  const fh = await open(file, "r");
  try {
    const buf = Buffer.alloc(end - start);
    await fh.read(buf, 0, buf.length, start);
    return buf.toString("utf8");
  } finally {
    await fh.close();
  }
}

/** Emits the last `n` complete lines; returns the offset where following continues. */
async function tail(file: string, n: number, emit: (lines: string[]) => void): Promise<number> {
  const size = await stat(file).then(
    (st) => st.size,
    () => -1,
  );
  if (size < 0) return 0;
  const start = Math.max(0, size - TAIL_WINDOW_BYTES);
  const text = await readRange(file, start, size);
  const complete = text.slice(0, text.lastIndexOf("\n") + 1);
  const lines = splitLines(complete).slice(0, -1);
  if (start > 0) lines.shift(); // the first line of the window may be cut
  const last = n === 0 ? [] : lines.slice(-n);
  for (let i = 0; i < last.length; i += MAX_LINES_PER_CHUNK) {
    emit(last.slice(i, i + MAX_LINES_PER_CHUNK));
  }
  return start + complete.length;
}
