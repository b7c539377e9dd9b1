// The host side of the guest agent's channel (host-agent/guest/agent-protocol.ts): one connection
// per guest, many sessions on it. A GuestLink is made when a stream first needs the guest and
// lives until its socket closes (the guest stopped) or it is closed (the instance is stopping,
// snapshotting or forking); every session still open then ends with the reason.
import { randomBytes } from "node:crypto";
import net from "node:net";
import type { PathInfo } from "@offshoot/shared";
import {
  decodeFields,
  EXIT_FIELDS,
  encodeFields,
  encodeFrame,
  type Fields,
  GUEST,
  HEADER_BYTES,
  HELLO_TEXT,
  HOST,
  IN_WINDOW,
  MAX_PAYLOAD,
  OPEN_FIELDS,
  OUT_WINDOW,
  STAT_FIELDS,
  u32,
} from "../../guest/agent-protocol.ts";

export interface ExecRequest {
  command: string[];
  env: Record<string, string>;
  cwd: string | null;
  tty: boolean;
  rows: number;
  cols: number;
  /** Seconds; 0: none. */
  timeout: number;
}

export interface ExecEnd {
  code: number;
  /** The command could not be started (or the session broke off), and why. */
  error?: string;
  timedOut?: boolean;
}

/** What a session's owner is told. `output` hands over bytes the owner must later `credit`
 * (once they have gone on), else the guest stops sending. */
export interface SessionHandlers {
  output(data: Buffer, stream: "stdout" | "stderr"): void;
  end(end: ExecEnd): void;
}

export class GuestLinkError extends Error {}

/** A command running in a guest. */
export interface Session {
  /** Queues stdin; resolves once the guest has room for it (write no more before). */
  write(data: Buffer): Promise<void>;
  /** Ends the command's stdin once what was written has gone in. */
  closeStdin(): void;
  resize(rows: number, cols: number): void;
  /** The owner passed on `bytes` of output: the guest may send that many more. */
  credit(bytes: number): void;
  /** Ends the session: its processes are killed. No `end` follows. */
  kill(): void;
}

/** What runs commands in a guest and answers stat: its agent (GuestLink), or a simulation. */
export interface Guest {
  exec(req: ExecRequest, handlers: SessionHandlers): Session;
  stat(path: string, followLinks: boolean): Promise<PathInfo>;
}

/** How long a guest has to answer the link's hello. */
const HELLO_TIMEOUT_MS = 5_000;

export class GuestSession implements Session {
  private stdinCredit = IN_WINDOW;
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private eofWanted = false;
  private drainWaiters: Array<() => void> = [];
  ended = false;

  constructor(
    private link: GuestLink,
    readonly id: number,
    readonly handlers: SessionHandlers,
  ) {}

  /** Queues stdin. Resolves once the guest has room for all of it (the caller should not write
   * more before): what a session holds on the host is bounded by what its caller lets queue. */
  write(data: Buffer): Promise<void> {
    if (this.ended || data.length === 0) return Promise.resolve();
    this.pending.push(data);
    this.pendingBytes += data.length;
    this.flush();
    if (this.pendingBytes === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /** Ends the command's stdin once what was written has gone in. */
  closeStdin(): void {
    this.eofWanted = true;
    this.flush();
  }

  resize(rows: number, cols: number): void {
    if (this.ended) return;
    const b = Buffer.alloc(4);
    b.writeUInt16BE(Math.min(rows, 0xffff), 0);
    b.writeUInt16BE(Math.min(cols, 0xffff), 2);
    this.link.send(HOST.resize, this.id, b);
  }

  /** The owner passed on `bytes` of output: the guest may send that many more. */
  credit(bytes: number): void {
    if (!this.ended && bytes > 0) this.link.send(HOST.credit, this.id, u32(bytes));
  }

  /** Ends the session: the guest kills its processes. */
  kill(): void {
    if (this.ended) return;
    this.link.send(HOST.kill, this.id);
    this.link.forget(this.id);
    this.finish();
  }

  /** @internal */
  gotCredit(bytes: number): void {
    this.stdinCredit += bytes;
    this.flush();
  }

  /** @internal */
  finish(): void {
    this.ended = true;
    this.pending = [];
    this.pendingBytes = 0;
    for (const w of this.drainWaiters.splice(0)) w();
  }

  private flush(): void {
    while (!this.ended && this.pending.length > 0 && this.stdinCredit > 0) {
      const head = this.pending[0] as Buffer;
      const n = Math.min(head.length, this.stdinCredit, MAX_PAYLOAD);
      this.link.send(HOST.stdin, this.id, head.subarray(0, n));
      this.stdinCredit -= n;
      this.pendingBytes -= n;
      if (n === head.length) this.pending.shift();
      else this.pending[0] = head.subarray(n);
    }
    if (this.pendingBytes === 0) {
      for (const w of this.drainWaiters.splice(0)) w();
      if (this.eofWanted && !this.ended) {
        this.eofWanted = false;
        this.link.send(HOST.eof, this.id);
      }
    }
  }
}

export class GuestLink implements Guest {
  private sock: net.Socket | undefined;
  private buf: Buffer = Buffer.alloc(0);
  private synced = false;
  private sessions = new Map<number, GuestSession>();
  private stats = new Map<number, (info: PathInfo) => void>();
  private nextId = 1;
  private closedWith: string | undefined;
  readonly ready: Promise<void>;
  private onClose: Array<() => void> = [];
  /** A reset's expected answer and its resolver. */
  private resetting: { expected: Buffer; done: () => void } | undefined;

  /** Connects and says hello; `ready` rejects when the guest does not answer in time. */
  constructor(socketPath: string, helloTimeoutMs = HELLO_TIMEOUT_MS) {
    const nonce = randomBytes(16).toString("hex");
    const expected = encodeFrame(GUEST.hello, 0, Buffer.from(HELLO_TEXT + nonce));
    this.ready = new Promise((resolve, reject) => {
      const sock = net.connect(socketPath);
      this.sock = sock;
      const timer = setTimeout(() => {
        reject(new GuestLinkError("the guest agent did not answer"));
        this.close("the guest agent did not answer");
      }, helloTimeoutMs);
      sock.on("connect", () => sock.write(encodeFrame(HOST.hello, 0, Buffer.from(nonce))));
      sock.on("data", (chunk: Buffer) => {
        this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
        if (!this.synced) {
          // Bytes before the answer to this hello are an older connection's.
          const at = this.buf.indexOf(expected);
          if (at < 0) {
            if (this.buf.length > 4 * MAX_PAYLOAD) this.buf = this.buf.subarray(-expected.length);
            return;
          }
          this.synced = true;
          clearTimeout(timer);
          this.buf = this.buf.subarray(at + expected.length);
          resolve();
        }
        this.readFrames();
      });
      sock.on("error", (e) => {
        clearTimeout(timer);
        reject(new GuestLinkError(`the guest agent is unreachable: ${e.message}`));
        this.close(`the guest agent's channel failed: ${e.message}`);
      });
      sock.on("close", () => {
        clearTimeout(timer);
        reject(new GuestLinkError("the guest agent's channel closed"));
        this.close("the guest stopped");
      });
    });
    this.ready.catch(() => {});
  }

  get closed(): boolean {
    return this.closedWith !== undefined;
  }

  whenClosed(fn: () => void): void {
    if (this.closed) fn();
    else this.onClose.push(fn);
  }

  /** Starts a command. */
  exec(req: ExecRequest, handlers: SessionHandlers): GuestSession {
    const id = this.allocate();
    const session = new GuestSession(this, id, handlers);
    if (this.closedWith !== undefined) {
      session.finish();
      queueMicrotask(() => handlers.end({ code: 127, error: this.closedWith }));
      return session;
    }
    this.sessions.set(id, session);
    const f: Array<[string, string]> = [[OPEN_FIELDS.op, "exec"]];
    for (const a of req.command) f.push([OPEN_FIELDS.argv, a]);
    for (const [k, v] of Object.entries(req.env)) f.push([OPEN_FIELDS.env, `${k}=${v}`]);
    if (req.cwd) f.push([OPEN_FIELDS.cwd, req.cwd]);
    if (req.tty) f.push([OPEN_FIELDS.tty, "1"]);
    if (req.rows) f.push([OPEN_FIELDS.rows, String(req.rows)]);
    if (req.cols) f.push([OPEN_FIELDS.cols, String(req.cols)]);
    if (req.timeout) f.push([OPEN_FIELDS.timeout, String(req.timeout)]);
    this.send(HOST.open, id, encodeFields(f));
    return session;
  }

  stat(path: string, followLinks: boolean): Promise<PathInfo> {
    if (this.closedWith !== undefined) return Promise.reject(new GuestLinkError(this.closedWith));
    const id = this.allocate();
    return new Promise((resolve, reject) => {
      this.stats.set(id, resolve);
      this.whenClosed(() => {
        if (this.stats.delete(id)) reject(new GuestLinkError(this.closedWith));
      });
      const f: Array<[string, string]> = [
        [OPEN_FIELDS.op, "stat"],
        [OPEN_FIELDS.path, path],
      ];
      if (followLinks) f.push([OPEN_FIELDS.follow, "1"]);
      this.send(HOST.open, id, encodeFields(f));
    });
  }

  /** Has the guest end every session (it kills their processes) and waits for it to confirm,
   * at most `timeoutMs`. Sessions open on this side end with `reason`. */
  async reset(timeoutMs = 2_000, reason = "the session was ended"): Promise<void> {
    if (this.closed) return;
    for (const s of this.sessions.values()) {
      s.finish();
      s.handlers.end({ code: 127, error: reason });
    }
    this.sessions.clear();
    const nonce = randomBytes(16).toString("hex");
    const expected = Buffer.from(HELLO_TEXT + nonce);
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.resetting = undefined;
        reject(new GuestLinkError("the guest agent did not confirm the reset"));
      }, timeoutMs);
      this.resetting = {
        expected,
        done: () => {
          clearTimeout(timer);
          this.resetting = undefined;
          resolve();
        },
      };
      this.whenClosed(() => this.resetting?.done());
      this.send(HOST.hello, 0, Buffer.from(nonce));
    });
  }

  /** Ends every session with `reason` and closes the channel. */
  close(reason: string): void {
    if (this.closedWith !== undefined) return;
    this.closedWith = reason;
    this.sock?.destroy();
    for (const s of this.sessions.values()) {
      s.finish();
      s.handlers.end({ code: 127, error: reason });
    }
    this.sessions.clear();
    for (const fn of this.onClose.splice(0)) fn();
  }

  /** @internal */
  send(type: number, id: number, payload?: Buffer): void {
    if (this.closedWith === undefined) this.sock?.write(encodeFrame(type, id, payload));
  }

  /** @internal */
  forget(id: number): void {
    this.sessions.delete(id);
  }

  private allocate(): number {
    const id = this.nextId;
    this.nextId = this.nextId >= 0xfffffffe ? 1 : this.nextId + 1;
    return id;
  }

  private readFrames(): void {
    let off = 0;
    while (this.buf.length - off >= HEADER_BYTES) {
      const type = this.buf.readUInt8(off);
      const id = this.buf.readUInt32BE(off + 1);
      const len = this.buf.readUInt32BE(off + 5);
      if (len > MAX_PAYLOAD) {
        this.close("the guest agent sent a malformed frame");
        return;
      }
      if (this.buf.length - off < HEADER_BYTES + len) break;
      const payload = this.buf.subarray(off + HEADER_BYTES, off + HEADER_BYTES + len);
      off += HEADER_BYTES + len;
      this.handle(type, id, payload);
      if (this.closed) return;
    }
    this.buf = off === this.buf.length ? Buffer.alloc(0) : Buffer.from(this.buf.subarray(off));
  }

  private handle(type: number, id: number, payload: Buffer): void {
    switch (type) {
      case GUEST.stdout:
      case GUEST.stderr: {
        const s = this.sessions.get(id);
        if (s) s.handlers.output(payload, type === GUEST.stdout ? "stdout" : "stderr");
        return;
      }
      case GUEST.credit: {
        if (payload.length === 4) this.sessions.get(id)?.gotCredit(payload.readUInt32BE(0));
        return;
      }
      case GUEST.exit: {
        const s = this.sessions.get(id);
        if (!s) return;
        this.sessions.delete(id);
        s.finish();
        s.handlers.end(exitOf(decodeFields(payload)));
        return;
      }
      case GUEST.hello: {
        if (this.resetting?.expected.equals(payload)) this.resetting.done();
        return;
      }
      case GUEST.stat: {
        const resolve = this.stats.get(id);
        if (!resolve) return;
        this.stats.delete(id);
        resolve(pathInfoOf(decodeFields(payload)));
        return;
      }
      default:
        return;
    }
  }
}

const one = (f: Fields, tag: string) => f.get(tag)?.[0];

function exitOf(f: Fields): ExecEnd {
  const code = Number(one(f, EXIT_FIELDS.code) ?? 127);
  const error = one(f, EXIT_FIELDS.error);
  return {
    code: Number.isInteger(code) ? code : 127,
    ...(error !== undefined && { error }),
    ...(one(f, EXIT_FIELDS.timedOut) === "1" && { timedOut: true }),
  };
}

function pathInfoOf(f: Fields): PathInfo {
  if (one(f, STAT_FIELDS.exists) !== "1") {
    const error = one(f, STAT_FIELDS.error);
    return { exists: false, ...(error !== undefined && { error }) };
  }
  const kind = one(f, STAT_FIELDS.kind);
  const target = one(f, STAT_FIELDS.linkTarget);
  return {
    exists: true,
    is_dir: kind === "d",
    is_file: kind === "f",
    is_symlink: kind === "l",
    ...(kind === "l" && { link_target: target ?? null }),
    mode: Number(one(f, STAT_FIELDS.mode) ?? 0),
    size: Number(one(f, STAT_FIELDS.size) ?? 0),
  };
}

export { OUT_WINDOW };
