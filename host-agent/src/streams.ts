// The agent's end of streams (shared/src/tunnel.ts): exec sessions and guest queries the control
// plane opens on this agent's socket. Each stream speaks the client's protocol (Hypeman's exec)
// here, against the driver's guest. Output waits in its stream's queue until the control plane's
// credit allows it and the socket's buffer is short; the guest gets credit back as its bytes go
// out, so a stream holds at most the guest's window (OUT_WINDOW) on this host.
import {
  type AgentMessage,
  encodeStreamData,
  ExecCloseStdin,
  ExecResize,
  ExecStart,
  execExit,
  PROTOCOL_VERSION,
  STREAM_LIMITS,
  type StreamOpen,
} from "@offshoot/shared";
import type { Driver } from "./drivers/driver.ts";
import type { Session } from "./guest/link.ts";
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

class ExecStream extends Stream {
  private session: Session | undefined;
  private starting = false;
  /** Input that arrived while the session started (within the stream's window: it is credited
   * only once the session has taken it). */
  private early: Array<[boolean, Uint8Array]> = [];

  constructor(
    id: string,
    open: StreamOpen,
    tunnel: Streams,
    private driver: Driver,
  ) {
    super(id, open, tunnel);
  }

  receive(textual: boolean, payload: Uint8Array): void {
    if (!this.session && !this.starting) {
      this.start(textual, payload);
      return;
    }
    const session = this.session;
    if (!session) {
      this.early.push([textual, payload]);
      return;
    }
    if (textual) {
      const s = Buffer.from(payload).toString("utf8");
      const control = controlOf(s);
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

  private start(textual: boolean, payload: Uint8Array): void {
    this.starting = true;
    this.tunnel.credit(this, payload.length);
    let start: ExecStart;
    try {
      if (!textual) throw new Error("first message must be JSON text");
      const parsed = ExecStart.safeParse(JSON.parse(Buffer.from(payload).toString("utf8")));
      if (!parsed.success) throw new Error(`invalid JSON: ${parsed.error.issues[0]?.message}`);
      start = parsed.data;
    } catch (e) {
      this.send(text(JSON.stringify({ error: errorMessage(e) })));
      this.finish("bad request");
      return;
    }
    const waitMs = start.wait_for_agent > 0 ? start.wait_for_agent * 1000 : DEFAULT_AGENT_WAIT_MS;
    this.driver
      .guest(this.open.instance_id, waitMs)
      .then((guest) => {
        if (this.ended) return;
        this.session = guest.exec(
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
            output: (data) => {
              const session = this.session;
              this.send({
                text: false,
                payload: data,
                sent: () => session?.credit(data.length),
              });
            },
            end: (end) => {
              if (end.error) this.send({ text: false, payload: utf8.encode(`Error: ${end.error}\r\n`) });
              this.send(text(execExit(end.code)));
              this.finish(end.timedOut ? "timed out" : "exited");
            },
          },
        );
        for (const [t, p] of this.early.splice(0)) this.receive(t, p);
      })
      .catch((e: unknown) => {
        this.send({ text: false, payload: utf8.encode(`Error: ${errorMessage(e)}\r\n`) });
        this.send(text(execExit(127)));
        this.finish("failed");
      });
  }

  cancel(): void {
    this.session?.kill();
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
        : msg.kind === "stat" || msg.kind === "stats"
          ? new QueryStream(msg.stream_id, msg, this, this.driver)
          : undefined;
    if (!stream) {
      socket.control({
        v: PROTOCOL_VERSION,
        type: "stream_end",
        stream_id: msg.stream_id,
        error: { code: "not_supported", message: `streams of kind ${msg.kind} are not served here` },
      });
      return;
    }
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
          socket.data(
            encodeStreamData({ streamId: s.id, text: m.text, payload: m.payload }),
            () => {
              m.sent?.();
              this.pump();
            },
          );
          if (s.queue.length === 0) {
            const waiter = this.flushWaiters.get(s);
            if (waiter) {
              this.flushWaiters.delete(s);
              waiter();
            }
          }
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
