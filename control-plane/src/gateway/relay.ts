// The control plane's end of one stream on an agent's socket (shared/src/tunnel.ts): what the
// client sends goes to the agent within the agent's credit, what the agent sends goes to the
// client and is credited back once the client's socket has taken it. Runtime-free: the Node
// gateway and the Workers' HostSession both use it.
import {
  type CommandError,
  encodeStreamData,
  PROTOCOL_VERSION,
  type ServerMessage,
  STREAM_LIMITS,
  StreamCredit,
  type StreamData,
  StreamEnd,
  type StreamOpen,
} from "@offshoot/shared";

/** Where a stream's messages from the agent go. */
export interface StreamSink {
  /** A message for the client; resolves once the client's socket has taken it. */
  message(text: boolean, payload: Uint8Array): void | Promise<void>;
  /** The stream is over: `reason` from the agent, or `error` when it could not be served or
   * broke off (the host went away). Called once. */
  end(reason?: string, error?: CommandError): void;
}

/** The client's side of a stream. */
export interface StreamHandle {
  /** A client message for the agent; resolves once the agent's credit allows the next one (a
   * client should not be read further before). */
  send(text: boolean, payload: Uint8Array): Promise<void>;
  /** The client went away: the agent ends the stream (and kills what it ran). */
  close(): void;
}

/** What the relay needs of the agent's socket. */
export interface AgentWire {
  control(msg: ServerMessage): void;
  data(frame: Uint8Array<ArrayBuffer>): void;
}

export type StreamRequest = Pick<StreamOpen, "instance_id" | "kind" | "query">;

export class TextTooLongError extends Error {}

export class Relay implements StreamHandle {
  private credit: number = STREAM_LIMITS.window;
  private waiters: Array<() => void> = [];
  private done = false;
  /** Sends to the client, in order: a message is credited once it and those before it went. */
  private delivering: Promise<void> = Promise.resolve();

  constructor(
    readonly id: string,
    readonly hostId: string,
    private wire: AgentWire,
    private sink: StreamSink,
  ) {}

  start(req: StreamRequest): void {
    this.wire.control({ v: PROTOCOL_VERSION, type: "stream_open", stream_id: this.id, ...req });
  }

  async send(text: boolean, payload: Uint8Array): Promise<void> {
    if (text && payload.length > STREAM_LIMITS.messageBytes) {
      throw new TextTooLongError(
        `text messages are limited to ${STREAM_LIMITS.messageBytes} bytes`,
      );
    }
    for (let i = 0; i < payload.length || i === 0; i += STREAM_LIMITS.messageBytes) {
      const part = payload.subarray(i, i + STREAM_LIMITS.messageBytes);
      while (!this.done && this.credit < part.length) {
        await new Promise<void>((resolve) => this.waiters.push(resolve));
      }
      if (this.done) return;
      this.credit -= part.length;
      this.wire.data(encodeStreamData({ streamId: this.id, text, payload: part }));
      if (i + STREAM_LIMITS.messageBytes >= payload.length) break;
    }
  }

  close(): void {
    if (this.done) return;
    this.finish();
    this.wire.control({ v: PROTOCOL_VERSION, type: "stream_end", stream_id: this.id });
  }

  /** A message from the agent. */
  fromAgent(text: boolean, payload: Uint8Array): void {
    if (this.done) return;
    const bytes = payload.length;
    this.delivering = this.delivering
      .then(() => this.sink.message(text, payload))
      .then(() => {
        if (!this.done && bytes > 0)
          this.wire.control({
            v: PROTOCOL_VERSION,
            type: "stream_credit",
            stream_id: this.id,
            bytes,
          });
      })
      .catch(() => this.close());
  }

  /** The agent passed `bytes` on. */
  credited(bytes: number): void {
    this.credit += bytes;
    for (const w of this.waiters.splice(0)) w();
  }

  /** The agent ended the stream (after its last message), or the host went away. */
  ended(reason?: string, error?: CommandError): void {
    if (this.done) return;
    this.finish();
    void this.delivering.then(() => this.sink.end(reason, error));
  }

  get finished(): boolean {
    return this.done;
  }

  private finish(): void {
    this.done = true;
    for (const w of this.waiters.splice(0)) w();
  }
}

/** The streams relayed to agents' sockets held by one process (the Node gateway's, a
 * HostSession's), by stream id: what opens them, and where the agent's stream messages go. */
export class Relays {
  private relays = new Map<string, Relay>();

  /** A stream to `hostId` through `wire` (that host's agent socket). */
  open(hostId: string, wire: AgentWire, req: StreamRequest, sink: StreamSink): StreamHandle {
    const id = crypto.randomUUID();
    const relay = new Relay(id, hostId, wire, {
      message: (text, payload) => sink.message(text, payload),
      end: (reason, error) => {
        this.relays.delete(id);
        sink.end(reason, error);
      },
    });
    this.relays.set(id, relay);
    relay.start(req);
    return {
      send: (text, payload) => relay.send(text, payload),
      close: () => {
        this.relays.delete(id);
        relay.close();
      },
    };
  }

  /** A stream's credit or end from `hostId`'s agent (another host's stream ids are not its). */
  control(hostId: string, msg: StreamCredit | StreamEnd): void {
    const relay = this.relays.get(msg.stream_id);
    if (relay?.hostId !== hostId) return;
    if (msg.type === "stream_credit") relay.credited(msg.bytes);
    else {
      this.relays.delete(msg.stream_id);
      relay.ended(msg.reason, msg.error);
    }
  }

  /** A stream's message from `hostId`'s agent. */
  data(hostId: string, frame: StreamData): void {
    const relay = this.relays.get(frame.streamId);
    if (relay?.hostId === hostId) relay.fromAgent(frame.text, frame.payload);
  }

  /** Every stream of the host (or all) ends with host_unavailable. */
  endAll(hostId: string | undefined, message: string): void {
    for (const [id, relay] of this.relays) {
      if (hostId !== undefined && relay.hostId !== hostId) continue;
      this.relays.delete(id);
      relay.ended(undefined, { code: "host_unavailable", message });
    }
  }
}

/** A stream_credit or stream_end in an agent's (or a hop's) text message, told apart cheaply
 * from the others; undefined for anything else. */
export function streamControl(text: string): StreamCredit | StreamEnd | undefined {
  if (!text.includes('"type":"stream_')) return undefined;
  try {
    return streamControlOf(JSON.parse(text));
  } catch {
    return undefined;
  }
}

/** The same, of a message already parsed. */
export function streamControlOf(raw: unknown): StreamCredit | StreamEnd | undefined {
  const credit = StreamCredit.safeParse(raw);
  if (credit.success) return credit.data;
  const end = StreamEnd.safeParse(raw);
  return end.success ? end.data : undefined;
}
