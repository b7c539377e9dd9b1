import {
  CLOSE,
  type Command,
  decodeStreamData,
  encode,
  type LogChunk,
  type ServerMessage,
  type StreamCredit,
  type StreamData,
  type StreamEnd,
  type Welcome,
} from "@offshoot/shared";
import {
  type AgentLink,
  handleAgentMessage,
  readAgentFrame,
} from "../services/agent-messages/index.ts";
import {
  AgentMessageQueue,
  DATABASE_RETRY_MS,
  MAX_QUEUED,
} from "../services/agent-messages/queue.ts";
import type { Services } from "../services/context.ts";

/** The minimum a transport gives a session: send a text frame, close the socket. */
export interface AgentSocket {
  send(text: string): void;
  /** A binary frame: a stream's message (tunnel.ts). */
  sendBinary(frame: Uint8Array<ArrayBuffer>): void;
  close(code: number, reason: string): void;
}

const HELLO_TIMEOUT_MS = 10_000;

/**
 * One agent connection held by this process. Messages are recorded in arrival order by the
 * agent-message service; heartbeats and log chunks, which need no database, skip the queue
 * once the hello is in.
 */
export class AgentSession implements AgentLink {
  readonly connectedAt = new Date();
  private helloSeen = false;
  private helloTimer: NodeJS.Timeout;
  /** The transport saw the socket close: nothing this session does may outlast that. */
  private gone = false;
  private queue: AgentMessageQueue;

  constructor(
    private s: () => Services,
    readonly host: { id: string; name: string },
    private socket: AgentSocket,
    private hooks: {
      onHello(session: AgentSession): void;
      onHeartbeat(hostId: string): void;
      onLog(hostId: string, chunk: LogChunk): void;
      onStream(hostId: string, msg: StreamCredit | StreamEnd): void;
      onStreamData(hostId: string, frame: StreamData): void;
    },
  ) {
    this.helloTimer = setTimeout(
      () => this.socket.close(CLOSE.badProtocol, "no hello"),
      HELLO_TIMEOUT_MS,
    );
    this.queue = new AgentMessageQueue((level, msg, fields) => this.s().log(level, msg, fields), {
      retryMs: DATABASE_RETRY_MS,
      maxQueued: MAX_QUEUED,
      stop: () => this.gone,
    });
  }

  get hostId(): string {
    return this.host.id;
  }

  get ready(): boolean {
    return this.helloSeen;
  }

  send(command: Command): void {
    this.socket.send(encode(command));
  }

  sendMessage(msg: ServerMessage): void {
    this.socket.send(encode(msg));
  }

  sendBinary(frame: Uint8Array<ArrayBuffer>): void {
    this.socket.sendBinary(frame);
  }

  /** A binary frame from the agent: a stream's message. */
  receiveBinary(bytes: Uint8Array): void {
    if (!this.helloSeen) return;
    const frame = decodeStreamData(bytes);
    if (frame) this.hooks.onStreamData(this.host.id, frame);
    else this.s().log("warn", "bad stream frame", { host_id: this.host.id });
  }

  close(code: number, reason: string): void {
    clearTimeout(this.helloTimer);
    this.socket.close(code, reason);
  }

  receive(text: string): void {
    const msg = readAgentFrame(this.s().log, this, text);
    if (!msg) return;
    // Live data needs no database: it does not wait behind a message that does.
    if (this.helloSeen && msg.type === "heartbeat") this.heartbeat();
    else if (this.helloSeen && msg.type === "log") this.log(msg);
    else if (this.helloSeen && (msg.type === "stream_credit" || msg.type === "stream_end"))
      this.stream(msg);
    else void this.queue.push(this, () => handleAgentMessage(this.s(), this, msg));
  }

  /** The socket closed. Resolves once every message received before that has been handled, so
   * that recording the disconnect comes after (a hello still being recorded would otherwise
   * mark the host online after its socket was gone). */
  ended(): Promise<void> {
    this.gone = true;
    clearTimeout(this.helloTimer);
    return this.queue.drained();
  }

  helloArrived(welcome: Welcome): boolean {
    clearTimeout(this.helloTimer);
    // Its socket is gone: this session must not become the host's.
    if (this.gone) return false;
    if (!this.helloSeen) {
      this.helloSeen = true;
      this.sendMessage(welcome);
      // Registered before reconciling, so the re-sent commands find this session.
      this.hooks.onHello(this);
    }
    return true;
  }

  heartbeat(): void {
    this.hooks.onHeartbeat(this.host.id);
  }

  log(chunk: LogChunk): void {
    this.hooks.onLog(this.host.id, chunk);
  }

  stream(msg: StreamCredit | StreamEnd): void {
    this.hooks.onStream(this.host.id, msg);
  }
}
