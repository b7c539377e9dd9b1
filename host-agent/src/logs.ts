// Log streams the control plane asks for: the last `tail` lines of a log file and, with
// `follow`, the lines appended after, until the control plane cancels, the guest powers off, or
// the file goes away (the instance was deleted). Files are read by offset, so a follower never
// re-reads a log. Every stream is flow-controlled: it sends at most AGENT_LIMITS.logWindow
// chunks ahead of the reader's acknowledgements (logs_ack), so a slow reader slows the reading
// of the file — guest output piles up on the host's disk, never in anyone's memory.
import { open, stat } from "node:fs/promises";
import { StringDecoder } from "node:string_decoder";
import {
  AGENT_LIMITS,
  type LogChunk,
  type LogsRequest,
  logChunks,
  PROTOCOL_VERSION,
} from "@offshoot/shared";
import type { Driver } from "./drivers/driver.ts";
import type { OperationsLog } from "./operations-log.ts";
import type { AgentPaths } from "./paths.ts";

const FOLLOW_POLL_MS = 200;
/** How far back from the end `tail` reads at most: long lines beyond it are not worth it. */
const TAIL_WINDOW_BYTES = 4 * 1024 * 1024;
/** How much of a log a follower reads per step (then waits for its reader's credit). */
const READ_BYTES = 1024 * 1024;
/** Streams one agent serves at once; more are refused. */
export const MAX_LOG_STREAMS = 256;

type Send = (chunk: LogChunk) => void;

/** One stream's state: cancelled, and the chunks it may still send before an ack. */
class Stream {
  cancelled = false;
  private credit: number = AGENT_LIMITS.logWindow;
  private wake: (() => void) | undefined;

  ack(chunks: number): void {
    this.credit = Math.min(this.credit + chunks, AGENT_LIMITS.logWindow);
    this.wake?.();
  }

  cancel(): void {
    this.cancelled = true;
    this.wake?.();
  }

  /** Waits until a chunk may be sent (false: cancelled meanwhile), and takes the credit. */
  async take(): Promise<boolean> {
    while (this.credit <= 0 && !this.cancelled) {
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
      this.wake = undefined;
    }
    if (this.cancelled) return false;
    this.credit--;
    return true;
  }

  /** Waits `ms`, or less if cancelled. */
  pause(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const timer = setTimeout(done, ms);
      this.wake = done;
      function done() {
        clearTimeout(timer);
        resolve();
      }
    }).then(() => {
      this.wake = undefined;
    });
  }
}

export class LogStreams {
  private streams = new Map<string, Stream>();

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
    const chunk = (lines: string[], end?: Pick<LogChunk, "done" | "error">): LogChunk => ({
      v: PROTOCOL_VERSION,
      type: "log",
      stream_id: req.stream_id,
      lines,
      ...end,
    });
    if (this.streams.size >= MAX_LOG_STREAMS) {
      send(
        chunk([], {
          done: true,
          error: {
            code: "insufficient_resources",
            message: `this host serves ${MAX_LOG_STREAMS} log streams at once; close one first`,
          },
        }),
      );
      return;
    }
    const stream = new Stream();
    this.streams.set(req.stream_id, stream);
    const emit = async (lines: string[]) => {
      for (const part of logChunks(lines)) {
        if (!(await stream.take())) return false;
        send(chunk(part));
      }
      return true;
    };
    this.run(req, stream, emit)
      .then(() => send(chunk([], { done: true })))
      .catch((e: unknown) =>
        send(chunk([], { done: true, error: { code: "internal_error", message: String(e) } })),
      )
      .finally(() => this.streams.delete(req.stream_id));
  }

  /** The reader took `chunks` more chunks of the stream. */
  ack(streamId: string, chunks: number): void {
    this.streams.get(streamId)?.ack(chunks);
  }

  cancel(streamId: string): void {
    this.streams.get(streamId)?.cancel();
  }

  /** The connection is gone: every stream it carried ends. */
  cancelAll(): void {
    for (const s of this.streams.values()) s.cancel();
  }

  private async run(
    req: LogsRequest,
    stream: Stream,
    emit: (lines: string[]) => Promise<boolean>,
  ): Promise<void> {
    if ((await this.driver.get(req.instance_id)) === null) return;
    const file = this.fileFor(req.instance_id, req.source);
    if (!file) return;
    // Lines of operations that finished before this request are on disk before it is read.
    if (req.source === "hypeman") await this.operationsLog?.settled();
    let offset = await tail(file, req.tail, emit);
    if (offset < 0) return; // cancelled during the tail
    // A guest's console and its hypervisor's output end when it powers off; the record of
    // operations goes on as long as the instance does.
    const endsWithGuest = req.source !== "hypeman";
    const decoder = new StringDecoder("utf8");
    let partial = "";
    while (req.follow && !stream.cancelled) {
      const size = await stat(file).then(
        (st) => st.size,
        () => -1,
      );
      if (size < offset) offset = 0; // truncated or replaced: start over
      if (size <= offset) {
        const now = await this.driver.get(req.instance_id);
        // Deleted (its log went with it), or powered off with everything sent.
        if (now === null || (endsWithGuest && now.state === "Stopped" && size >= 0)) {
          if (partial && !stream.cancelled) await emit([partial]);
          return;
        }
        await stream.pause(FOLLOW_POLL_MS);
        continue;
      }
      const end = Math.min(size, offset + READ_BYTES);
      const text = partial + decoder.write(await readRange(file, offset, end));
      offset = end;
      const lines = splitLines(text);
      partial = lines.pop() ?? "";
      // A line without an end yet goes out in pieces once it is a full line's worth.
      if (partial.length >= AGENT_LIMITS.logLineChars) {
        lines.push(partial);
        partial = "";
      }
      if (lines.length > 0 && !(await emit(lines))) return;
    }
  }
}

/** Serial consoles end lines with CRLF; a line is sent without its terminator. */
const splitLines = (text: string) => text.split("\n").map((l) => l.replace(/\r$/, ""));

async function readRange(file: string, start: number, end: number): Promise<Buffer> {
  const fh = await open(file, "r");
  try {
    const buf = Buffer.alloc(end - start);
    const { bytesRead } = await fh.read(buf, 0, buf.length, start);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/** Emits the last `n` complete lines; returns the offset where following continues, or -1 if
 * the stream was cancelled meanwhile. */
async function tail(
  file: string,
  n: number,
  emit: (lines: string[]) => Promise<boolean>,
): Promise<number> {
  const size = await stat(file).then(
    (st) => st.size,
    () => -1,
  );
  if (size < 0) return 0;
  const start = Math.max(0, size - TAIL_WINDOW_BYTES);
  const buf = await readRange(file, start, size);
  // Complete lines only, cut at a newline byte: the offset stays a byte offset.
  const complete = buf.lastIndexOf(0x0a) + 1;
  const lines = splitLines(buf.subarray(0, complete).toString("utf8")).slice(0, -1);
  if (start > 0) lines.shift(); // the first line of the window may be cut
  const last = n === 0 ? [] : lines.slice(-n);
  if (last.length > 0 && !(await emit(last))) return -1;
  return start + complete;
}
