// The agent's end of streams (shared/src/tunnel.ts): exec sessions and guest queries the control
// plane opens on this agent's socket. Each stream speaks the client's protocol (Hypeman's exec)
// here, against the driver's guest. Output waits in its stream's queue until the control plane's
// credit allows it and the socket's buffer is short; the guest gets credit back as its bytes go
// out, so a stream holds at most the guest's window (OUT_WINDOW) on this host.
import {
  type AgentMessage,
  CpEnd,
  CpStart,
  ExecCloseStdin,
  ExecResize,
  ExecStart,
  encodeStreamData,
  execExit,
  PROTOCOL_VERSION,
  STREAM_LIMITS,
  type StreamOpen,
} from "@offshoot/shared";
import type { z } from "zod";
import type { Driver } from "./drivers/driver.ts";
import type { Guest, Session } from "./guest/link.ts";
import { escapes, TAR_END, TarReader, tarHeader, tarPadding } from "./guest/tar.ts";
import { errorMessage, type Logger } from "./log.ts";

/** What the streams need of the socket. */
export interface TunnelSocket {
  /** A JSON message, sent now (control messages never wait behind stream data). */
  control(msg: AgentMessage): void;
  /** A stream's binary frame; `sent` once it has left the socket's buffer. */
  data(frame: Uint8Array, sent: () => void): void;
  /** Bytes the socket holds unsent. */
  buffered(): number;
}

/** How long exec waits for the guest agent without wait_for_agent. */
const DEFAULT_AGENT_WAIT_MS = 5_000;

interface Message {
  text: boolean;
  payload: Uint8Array;
  /** Called once it is on the socket (credit back to the guest). */
  sent?: () => void;
  /** Empty: not sent, only its `sent` called in its turn. */
  skipEmpty?: boolean;
}

const utf8 = new TextEncoder();
const text = (s: string): Message => ({ text: true, payload: utf8.encode(s) });

abstract class Stream {
  /** Bytes the control plane will still take. */
  credit: number = STREAM_LIMITS.window;
  readonly queue: Message[] = [];
  /** Ends once the queue is sent. */
  private ending = false;
  ended = false;

  constructor(
    readonly id: string,
    readonly open: StreamOpen,
    protected readonly tunnel: Streams,
  ) {}

  /** Queues a message for the control plane (split to the tunnel's message size). */
  send(m: Message): void {
    if (this.ended || this.ending) return;
    for (let i = 0; i < m.payload.length || i === 0; i += STREAM_LIMITS.messageBytes) {
      const last = i + STREAM_LIMITS.messageBytes >= m.payload.length;
      this.queue.push({
        text: m.text,
        payload: m.payload.subarray(i, i + STREAM_LIMITS.messageBytes),
        ...(last && m.sent && { sent: m.sent }),
        ...(m.skipEmpty && { skipEmpty: true }),
      });
      if (last) break;
    }
    this.tunnel.pump();
  }

  /** Ends the stream after what is queued. */
  finish(reason?: string): void {
    if (this.ending || this.ended) return;
    this.ending = true;
    this.tunnel.whenFlushed(this, () => this.tunnel.end(this, reason));
  }

  /** A message from the client, through the control plane. */
  abstract receive(textual: boolean, payload: Uint8Array): void;
  /** The control plane ended the stream (the client went away), or the socket closed. */
  abstract cancel(): void;
}

/**
 * A stream that runs one command in the guest (exec, cp), begun by the client's first message: a
 * JSON text of the protocol's start schema. Input that arrives while the guest is reached waits
 * here, within the stream's window (it is credited only once the session has taken it).
 */
abstract class CommandStream<S> extends Stream {
  protected session: Session | undefined;
  private begun = false;
  private early: Array<[boolean, Uint8Array]> = [];

  constructor(
    id: string,
    open: StreamOpen,
    tunnel: Streams,
    private driver: Driver,
    private schema: z.ZodType<S>,
  ) {
    super(id, open, tunnel);
  }

  /** What a start the schema refuses is called, in the protocol's words. */
  protected abstract invalid(error: z.ZodError): string;
  /** The first message was not a start: said as the protocol says it, before the stream ends. */
  protected abstract refuse(message: string): void;
  /** How long to wait for the guest's agent. */
  protected waitMs(_start: S): number {
    return DEFAULT_AGENT_WAIT_MS;
  }
  /** Starts the session in the guest. */
  protected abstract launch(start: S, guest: Guest): Session;
  /** The guest could not be reached: said, and the stream ended. */
  protected abstract unreachable(message: string): void;
  /** A client message once the session runs. */
  protected abstract input(session: Session, textual: boolean, payload: Uint8Array): void;

  receive(textual: boolean, payload: Uint8Array): void {
    if (!this.begun) {
      this.begun = true;
      this.begin(textual, payload);
    } else if (!this.session) this.early.push([textual, payload]);
    else this.input(this.session, textual, payload);
  }

  private begin(textual: boolean, payload: Uint8Array): void {
    this.tunnel.credit(this, payload.length);
    let start: S;
    try {
      if (!textual) throw new Error("first message must be JSON text");
      const parsed = this.schema.safeParse(JSON.parse(Buffer.from(payload).toString("utf8")));
      if (!parsed.success) throw new Error(this.invalid(parsed.error));
      start = parsed.data;
    } catch (e) {
      this.refuse(errorMessage(e));
      this.finish("bad request");
      return;
    }
    this.driver
      .guest(this.open.instance_id, this.waitMs(start))
      .then((guest) => {
        if (this.ended) return;
        this.session = this.launch(start, guest);
        for (const [t, p] of this.early.splice(0)) this.receive(t, p);
      })
      .catch((e: unknown) => this.unreachable(errorMessage(e)));
  }

  cancel(): void {
    this.session?.kill();
  }
}

class ExecStream extends CommandStream<ExecStart> {
  constructor(id: string, open: StreamOpen, tunnel: Streams, driver: Driver) {
    super(id, open, tunnel, driver, ExecStart);
  }

  protected invalid(error: z.ZodError): string {
    return `invalid JSON: ${error.issues[0]?.message}`;
  }

  protected refuse(message: string): void {
    this.send(text(JSON.stringify({ error: message })));
  }

  protected override waitMs(start: ExecStart): number {
    return start.wait_for_agent > 0 ? start.wait_for_agent * 1000 : DEFAULT_AGENT_WAIT_MS;
  }

  protected launch(start: ExecStart, guest: Guest): Session {
    const session = guest.exec(
      {
        command: start.command.length > 0 ? start.command : ["/bin/sh"],
        env: start.env,
        cwd: start.cwd || null,
        tty: start.tty,
        rows: start.rows,
        cols: start.cols,
        timeout: start.timeout,
      },
      {
        output: (data) =>
          this.send({ text: false, payload: data, sent: () => session.credit(data.length) }),
        end: (end) => {
          if (end.error)
            this.send({ text: false, payload: utf8.encode(`Error: ${end.error}\r\n`) });
          this.send(text(execExit(end.code)));
          this.finish(end.timedOut ? "timed out" : "exited");
        },
      },
    );
    return session;
  }

  protected unreachable(message: string): void {
    this.send({ text: false, payload: utf8.encode(`Error: ${message}\r\n`) });
    this.send(text(execExit(127)));
    this.finish("failed");
  }

  protected input(session: Session, textual: boolean, payload: Uint8Array): void {
    if (textual) {
      const control = controlOf(Buffer.from(payload).toString("utf8"));
      if (control?.kind === "resize") {
        session.resize(control.rows, control.cols);
        this.tunnel.credit(this, payload.length);
        return;
      }
      if (control?.kind === "close_stdin") {
        session.closeStdin();
        this.tunnel.credit(this, payload.length);
        return;
      }
    }
    void session.write(Buffer.from(payload)).then(() => this.tunnel.credit(this, payload.length));
  }
}

/** The guest's own busybox (its /init's, mounted read-only at /.offshoot in every guest): cp's
 * commands work whatever the image holds. */
const GUEST_TOOLS = { PATH: "/.offshoot" };
/** What a failed guest command's stderr may fill of its error message. */
const MAX_STDERR = 4096;

const CP_TO_FILE = [
  'if [ -d "$1" ]; then echo "$1 is a directory" >&2; exit 1; fi',
  'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1" &&',
  '{ [ "$3" = 0 ] || [ "$4" = 0 ] || chown "$3:$4" "$1"; }',
].join("\n");
const CP_TO_DIR =
  'mkdir -p "$1" && chmod "$2" "$1" && { [ "$3" = 0 ] || [ "$4" = 0 ] || chown "$3:$4" "$1"; }';
const CP_TO_ARCHIVE = 'mkdir -p "$1" && tar -x -C "$1"';
const CP_FROM = (follow: boolean) =>
  `[ -e "$1" ] || [ -L "$1" ] || { echo "$1: no such file or directory" >&2; exit 1; }\ntar -c${follow ? "h" : ""} -C "$(dirname "$1")" "$(basename "$1")"`;

/** cp (Hypeman's protocol, see CpStart): the guest's busybox moves the bytes; this side speaks
 * the protocol, and checks a client's archive before any of it reaches the guest. */
class CpStream extends CommandStream<CpStart> {
  private start: CpStart | undefined;
  private stderr = "";
  private received = 0;
  private failed = false;
  /** to + archive: the client's archive, read and written anew for the guest. */
  private archive: { reader: TarReader; out: Buffer[]; symlinks: Set<string> } | undefined;
  /** from: the guest's archive, read into headers and data. */
  private reader: TarReader | undefined;
  private entryOpen = false;

  constructor(id: string, open: StreamOpen, tunnel: Streams, driver: Driver) {
    super(id, open, tunnel, driver, CpStart);
  }

  protected invalid(error: z.ZodError): string {
    const issue = error.issues[0];
    return `invalid request: ${issue?.path.join(".")} ${issue?.message}`;
  }

  protected refuse(message: string): void {
    this.send(text(JSON.stringify({ type: "error", message })));
  }

  protected unreachable(message: string): void {
    this.send(text(JSON.stringify({ type: "error", message })));
    this.finish("failed");
  }

  protected input(session: Session, textual: boolean, payload: Uint8Array): void {
    if (this.start?.direction !== "to" || this.failed) {
      this.tunnel.credit(this, payload.length);
      return;
    }
    if (textual) {
      this.tunnel.credit(this, payload.length);
      let end = false;
      try {
        end = CpEnd.safeParse(JSON.parse(Buffer.from(payload).toString("utf8"))).success;
      } catch {
        end = false;
      }
      if (!end) {
        this.fail('expected binary data or {"type":"end"}');
        return;
      }
      if (this.archive) {
        try {
          this.archive.reader.close();
        } catch (e) {
          this.fail(errorMessage(e));
          return;
        }
        void session.write(Buffer.concat(this.archive.out.splice(0)));
      }
      session.closeStdin();
      return;
    }
    this.received += payload.length;
    let bytes = Buffer.from(payload);
    if (this.archive) {
      try {
        this.archive.reader.push(bytes);
      } catch (e) {
        this.fail(errorMessage(e));
        return;
      }
      bytes = Buffer.concat(this.archive.out.splice(0));
    }
    void session.write(bytes).then(() => this.tunnel.credit(this, payload.length));
  }

  protected launch(start: CpStart, guest: Guest): Session {
    this.start = start;
    const to = start.direction === "to";
    const mode = (start.mode || (start.is_dir ? 0o755 : 0o644)).toString(8);
    const script = !to
      ? CP_FROM(start.follow_links)
      : start.archive
        ? CP_TO_ARCHIVE
        : start.is_dir
          ? CP_TO_DIR
          : CP_TO_FILE;
    if (to && start.archive) this.archive = this.archiveChecker();
    if (!to && !start.archive) this.reader = this.guestArchiveReader();
    const session = guest.exec(
      {
        command: [
          "sh",
          "-c",
          script,
          "sh",
          start.guest_path,
          mode,
          String(start.uid),
          String(start.gid),
        ],
        env: GUEST_TOOLS,
        cwd: "/",
        tty: false,
        rows: 0,
        cols: 0,
        timeout: 0,
      },
      {
        output: (data, which) => this.output(data, which),
        end: (end) => this.ended_(end.code, end.error),
      },
    );
    // A directory has no data: the client's end may never matter, stdin ends now.
    if (to && start.is_dir && !start.archive) session.closeStdin();
    return session;
  }

  private output(data: Buffer, which: "stdout" | "stderr"): void {
    const session = this.session;
    const credit = () => session?.credit(data.length);
    if (which === "stderr") {
      this.stderr = (this.stderr + data.toString("utf8")).slice(0, MAX_STDERR);
      credit();
      return;
    }
    if (this.start?.direction !== "from" || this.failed) {
      credit();
      return;
    }
    if (!this.reader) {
      // archive: the guest's tar as it is.
      this.send({ text: false, payload: data, sent: credit });
      return;
    }
    try {
      this.reader.push(data);
    } catch (e) {
      credit();
      this.fail(errorMessage(e));
      return;
    }
    // Credit once what this chunk made has gone (an empty message when it made nothing).
    this.send({ text: false, payload: new Uint8Array(0), sent: credit, skipEmpty: true });
  }

  private ended_(code: number, error: string | undefined): void {
    if (this.failed) {
      this.finish("failed");
      return;
    }
    const problem = error ?? (code !== 0 ? this.stderr.trim() || `exit code ${code}` : undefined);
    const dir = this.start?.direction;
    if (dir === "to") {
      this.send(
        text(
          JSON.stringify({
            type: "result",
            success: problem === undefined,
            ...(problem === undefined ? { bytes_written: this.received } : { error: problem }),
          }),
        ),
      );
    } else if (problem !== undefined) {
      this.send(
        text(JSON.stringify({ type: "error", message: problem, path: this.start?.guest_path })),
      );
    } else if (this.reader) {
      if (this.entryOpen) this.send(text(JSON.stringify({ type: "end", final: true })));
    } else {
      this.send(text(JSON.stringify({ type: "end", final: true })));
    }
    this.finish(problem === undefined ? "copied" : "failed");
  }

  private fail(message: string): void {
    if (this.failed) return;
    this.failed = true;
    this.session?.kill();
    this.send(
      text(
        JSON.stringify({
          type: this.start?.direction === "to" ? "result" : "error",
          ...(this.start?.direction === "to" ? { success: false, error: message } : { message }),
        }),
      ),
    );
    this.finish("failed");
  }

  /** from: each entry of the guest's archive as a header, its data, and an end. */
  private guestArchiveReader(): TarReader {
    return new TarReader({
      entry: (e) => {
        if (this.entryOpen) this.send(text(JSON.stringify({ type: "end", final: false })));
        this.entryOpen = true;
        this.send(
          text(
            JSON.stringify({
              type: "header",
              path: e.path,
              mode: e.mode & 0o777,
              is_dir: e.type === "dir",
              ...(e.type === "symlink" && { is_symlink: true, link_target: e.linkTarget }),
              size: e.size,
              mtime: e.mtime,
              uid: e.uid,
              gid: e.gid,
            }),
          ),
        );
      },
      data: (chunk) => this.send({ text: false, payload: Buffer.from(chunk) }),
      end: () => {},
    });
  }

  /** to + archive: every entry checked (no absolute path, no "..", nothing through a symlink of
   * the archive's own, no devices), then written anew for the guest's tar. */
  private archiveChecker(): { reader: TarReader; out: Buffer[]; symlinks: Set<string> } {
    const out: Buffer[] = [];
    const symlinks = new Set<string>();
    let left = 0;
    let entrySize = 0;
    const reader = new TarReader({
      entry: (e) => {
        const why =
          escapes(e.path, symlinks) ??
          (e.type === "hardlink" ? escapes(e.linkTarget, symlinks) : undefined) ??
          (e.type === "other" ? "not a file, directory or link" : undefined);
        if (why) throw new Error(`archive entry ${JSON.stringify(e.path)} refused: ${why}`);
        const path = e.path
          .split("/")
          .filter((p) => p !== "" && p !== ".")
          .join("/");
        if (e.type === "symlink") symlinks.add(path);
        out.push(tarHeader({ ...e, path }));
        left = entrySize = e.type === "file" ? e.size : 0;
      },
      data: (chunk) => {
        out.push(Buffer.from(chunk));
        left -= chunk.length;
        if (left === 0) out.push(tarPadding(entrySize));
      },
      end: () => out.push(TAR_END),
    });
    return { reader, out, symlinks };
  }
}

/** stat and stats: one JSON answer. */
class QueryStream extends Stream {
  constructor(id: string, open: StreamOpen, tunnel: Streams, driver: Driver) {
    super(id, open, tunnel);
    const answer =
      open.kind === "stats"
        ? driver.stats(open.instance_id)
        : driver
            .guest(open.instance_id, DEFAULT_AGENT_WAIT_MS)
            .then((g) => g.stat(open.query?.path ?? "", open.query?.follow_links ?? false));
    answer.then(
      (value) => {
        this.send(text(JSON.stringify(value)));
        this.finish();
      },
      (e: unknown) => tunnel.fail(this, e),
    );
  }

  receive(): void {}
  cancel(): void {}
}

function controlOf(
  s: string,
): { kind: "resize"; rows: number; cols: number } | { kind: "close_stdin" } | undefined {
  if (!s.startsWith("{")) return undefined;
  try {
    const json: unknown = JSON.parse(s);
    const resize = ExecResize.safeParse(json);
    if (resize.success) return { kind: "resize", ...resize.data.resize };
    if (ExecCloseStdin.safeParse(json).success) return { kind: "close_stdin" };
  } catch {
    // Not JSON: stdin.
  }
  return undefined;
}

/** The streams open on one agent socket (a new socket starts with none). */
export class Streams {
  private streams = new Map<string, Stream>();
  private flushWaiters = new Map<Stream, () => void>();
  private pumping = false;
  private socket: TunnelSocket | undefined;

  constructor(
    private driver: Driver,
    private log: Logger,
  ) {}

  /** A socket is up: streams go out on it. */
  attach(socket: TunnelSocket): void {
    this.socket = socket;
  }

  open(msg: StreamOpen): void {
    const socket = this.socket;
    if (!socket) return;
    if (this.streams.has(msg.stream_id)) return;
    if (this.streams.size >= STREAM_LIMITS.perHost) {
      socket.control({
        v: PROTOCOL_VERSION,
        type: "stream_end",
        stream_id: msg.stream_id,
        error: {
          code: "insufficient_resources",
          message: `the host has ${STREAM_LIMITS.perHost} streams open`,
        },
      });
      return;
    }
    const stream =
      msg.kind === "exec"
        ? new ExecStream(msg.stream_id, msg, this, this.driver)
        : msg.kind === "cp"
          ? new CpStream(msg.stream_id, msg, this, this.driver)
          : new QueryStream(msg.stream_id, msg, this, this.driver);
    this.streams.set(msg.stream_id, stream);
  }

  /** A client message for a stream. */
  data(streamId: string, textual: boolean, payload: Uint8Array): void {
    this.streams.get(streamId)?.receive(textual, payload);
  }

  /** The control plane passed `bytes` of a stream on. */
  credited(streamId: string, bytes: number): void {
    const s = this.streams.get(streamId);
    if (!s) return;
    s.credit += bytes;
    this.pump();
  }

  /** The control plane ended a stream. */
  cancel(streamId: string): void {
    const s = this.streams.get(streamId);
    if (!s) return;
    this.streams.delete(streamId);
    s.ended = true;
    s.cancel();
    this.flushWaiters.delete(s);
  }

  /** The socket closed: every stream ends (their sessions are killed). */
  closeAll(): void {
    for (const id of [...this.streams.keys()]) this.cancel(id);
    this.socket = undefined;
  }

  /** @internal Tells the control plane the client's `bytes` went on. */
  credit(stream: Stream, bytes: number): void {
    if (stream.ended || bytes <= 0 || !this.socket) return;
    this.socket.control({
      v: PROTOCOL_VERSION,
      type: "stream_credit",
      stream_id: stream.id,
      bytes: Math.min(bytes, STREAM_LIMITS.window),
    });
  }

  /** @internal The stream could not be served: the control plane answers the client. */
  fail(stream: Stream, e: unknown): void {
    if (stream.ended) return;
    const code =
      e && typeof e === "object" && "code" in e && typeof e.code === "string"
        ? e.code
        : "internal_error";
    this.end(stream, undefined, { code, message: errorMessage(e) });
  }

  /** @internal */
  end(stream: Stream, reason?: string, error?: { code: string; message: string }): void {
    if (stream.ended) return;
    stream.ended = true;
    this.streams.delete(stream.id);
    this.flushWaiters.delete(stream);
    this.socket?.control({
      v: PROTOCOL_VERSION,
      type: "stream_end",
      stream_id: stream.id,
      ...(reason && { reason }),
      ...(error && { error: error as never }),
    });
  }

  /** @internal */
  whenFlushed(stream: Stream, fn: () => void): void {
    if (stream.queue.length === 0) fn();
    else this.flushWaiters.set(stream, fn);
  }

  private flushed(s: Stream): void {
    if (s.queue.length > 0) return;
    const waiter = this.flushWaiters.get(s);
    if (waiter) {
      this.flushWaiters.delete(s);
      waiter();
    }
  }

  /** @internal Sends what credit and the socket's buffer allow, one message per stream in
   * turn, so a bulk stream does not starve the others. */
  pump(): void {
    const socket = this.socket;
    if (this.pumping || !socket) return;
    this.pumping = true;
    try {
      let progress = true;
      while (progress && socket.buffered() < STREAM_LIMITS.socketBufferBytes) {
        progress = false;
        for (const s of this.streams.values()) {
          const m = s.queue[0];
          if (!m || m.payload.length > s.credit) continue;
          s.queue.shift();
          s.credit -= m.payload.length;
          progress = true;
          if (m.skipEmpty && m.payload.length === 0) {
            m.sent?.();
            this.flushed(s);
            continue;
          }
          socket.data(
            encodeStreamData({ streamId: s.id, text: m.text, payload: m.payload }),
            () => {
              m.sent?.();
              this.pump();
            },
          );
          this.flushed(s);
          if (socket.buffered() >= STREAM_LIMITS.socketBufferBytes) break;
        }
      }
    } catch (e) {
      this.log("error", "stream pump failed", { error: errorMessage(e) });
    } finally {
      this.pumping = false;
    }
  }
}
