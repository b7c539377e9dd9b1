// A small QMP client (QEMU Machine Protocol: JSON lines over a Unix socket). One client per QEMU:
// QEMU serves one QMP connection per `-qmp` socket at a time, so the driver keeps this one open.
//
//   const qmp = await QmpClient.connect(sock, { timeoutMs: 5_000 });
//   const status = await qmp.execute<{ status: string }>("query-status");
//   const off = qmp.onEvent((e) => …);
//   await qmp.close();
import net from "node:net";

/** sun_path is 108 bytes including the NUL (Linux). */
export const MAX_UNIX_SOCKET_PATH = 107;

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

/** QEMU answered a command with an error (`class` is e.g. GenericError, CommandNotFound). */
export class QmpCommandError extends Error {
  constructor(
    readonly command: string,
    readonly qmpClass: string,
    readonly desc: string,
  ) {
    super(`QMP ${command}: ${qmpClass}: ${desc}`);
    this.name = "QmpCommandError";
  }
}

/** The connection ended (QEMU exited, or close() was called) before a reply came. */
export class QmpClosedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "QmpClosedError";
  }
}

export function checkSocketPath(socketPath: string): string {
  if (Buffer.byteLength(socketPath) > MAX_UNIX_SOCKET_PATH) {
    throw new Error(`unix socket path longer than ${MAX_UNIX_SOCKET_PATH} bytes: ${socketPath}`);
  }
  return socketPath;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
}

type Message =
  | { QMP: QmpGreeting }
  | { return: unknown; id?: unknown }
  | { error: { class: string; desc: string }; id?: unknown }
  | QmpEvent;

export interface QmpConnectOptions {
  /** Keep retrying while the socket does not exist or refuses (QEMU still starting). */
  timeoutMs?: number;
  /** Give up early, e.g. when the QEMU process has already exited. */
  signal?: AbortSignal;
}

export class QmpClient {
  private buffer = "";
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly listeners = new Set<(event: QmpEvent) => void>();
  private closedError: QmpClosedError | undefined;
  private socketError: Error | undefined;
  private greetingWaiter: ((g: QmpGreeting) => void) | undefined;
  /** Resolves when the connection has ended, for whatever reason. */
  readonly closed: Promise<void>;
  greeting: QmpGreeting | undefined;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.onData(chunk));
    this.closed = new Promise((resolve) => {
      socket.on("close", () => {
        const why = this.socketError ? `: ${this.socketError.message}` : "";
        this.fail(new QmpClosedError(`QMP connection closed${why}`));
        resolve();
      });
    });
    // An error is always followed by "close", which rejects what is pending with it as reason.
    socket.on("error", (err) => {
      this.socketError = err;
    });
  }

  /** Connects, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(socketPath: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    checkSocketPath(socketPath);
    const deadline = Date.now() + (opts.timeoutMs ?? 0);
    for (;;) {
      opts.signal?.throwIfAborted();
      try {
        const socket = await openSocket(socketPath);
        const client = new QmpClient(socket);
        await client.handshake(Math.max(deadline - Date.now(), 5_000));
        return client;
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        const retryable = code === "ENOENT" || code === "ECONNREFUSED";
        if (!retryable || Date.now() >= deadline) {
          throw new Error(`QMP connect to ${socketPath} failed: ${(e as Error).message}`, {
            cause: e,
          });
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  private async handshake(timeoutMs: number): Promise<void> {
    const greeting = await new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new Error("no QMP greeting"));
        this.socket.destroy();
      }, timeoutMs);
      this.greetingWaiter = (g) => {
        clearTimeout(timer);
        resolve(g);
      };
      this.closed.then(() => {
        clearTimeout(timer);
        reject(new QmpClosedError("QMP connection closed before the greeting"));
      });
    });
    this.greeting = greeting;
    await this.execute("qmp_capabilities");
  }

  /** Runs a command; resolves with its `return` value or rejects with QmpCommandError. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    const msg =
      args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /** Every asynchronous event QEMU sends (STOP, RESUME, SHUTDOWN, …). Returns unsubscribe. */
  onEvent(listener: (event: QmpEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** Resolves with the next event named `name` (and matching `match`, if given). */
  waitForEvent(
    name: string,
    timeoutMs: number,
    match: (e: QmpEvent) => boolean = () => true,
  ): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        reject(new Error(`no QMP ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const off = this.onEvent((e) => {
        if (e.event !== name || !match(e)) return;
        clearTimeout(timer);
        off();
        resolve(e);
      });
    });
  }

  get isClosed(): boolean {
    return this.closedError !== undefined;
  }

  /** Ends the connection; QEMU keeps running. Pending commands reject with QmpClosedError. */
  async close(): Promise<void> {
    this.socket.end();
    const timer = setTimeout(() => this.socket.destroy(), 1_000);
    await this.closed;
    clearTimeout(timer);
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    for (;;) {
      const nl = this.buffer.indexOf("\n");
      if (nl < 0) return;
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: Message;
    try {
      msg = JSON.parse(line) as Message;
    } catch {
      this.socket.destroy(new Error(`QMP sent a line that is not JSON: ${line.slice(0, 200)}`));
      return;
    }
    if ("QMP" in msg) {
      this.greetingWaiter?.(msg.QMP);
      this.greetingWaiter = undefined;
    } else if ("event" in msg) {
      for (const l of [...this.listeners]) l(msg);
    } else if ("return" in msg || "error" in msg) {
      const id = typeof msg.id === "number" ? msg.id : undefined;
      const p = id === undefined ? undefined : this.pending.get(id);
      if (!p || id === undefined) return; // A reply to a command we did not send with an id.
      this.pending.delete(id);
      if ("error" in msg) p.reject(new QmpCommandError(p.command, msg.error.class, msg.error.desc));
      else p.resolve(msg.return);
    }
  }

  private fail(err: QmpClosedError): void {
    this.closedError ??= err;
    for (const [, p] of this.pending) {
      p.reject(new QmpClosedError(`${err.message} before ${p.command} was answered`));
    }
    this.pending.clear();
  }
}

function openSocket(socketPath: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(socketPath);
    socket.once("connect", () => {
      socket.removeListener("error", reject);
      resolve(socket);
    });
    socket.once("error", reject);
  });
}
