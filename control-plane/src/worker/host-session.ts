// One Durable Object per host: it holds the agent's WebSocket with the Hibernation API
// (ctx.acceptWebSocket), so an idle object can be evicted while the agent stays connected; the
// socket's attachment (host, connection time, whether hello arrived) is all the state that must
// survive that. Agent messages go through the same agent-message service as on Node, with the
// object's own database client. A command in flight when the object is evicted is not lost: it is
// recorded in Postgres, the agent's result wakes the object again and is recorded then, and the
// agent's next hello re-sends anything still pending.
import {
  CLOSE,
  Command,
  decodeStreamData,
  encode,
  type LogChunk,
  LogQuery,
  PROTOCOL_VERSION,
} from "@offshoot/shared";
import type { HostGateway } from "../gateway/host-gateway.ts";
import {
  Relays,
  type StreamHandle,
  type StreamRequest,
  type StreamSink,
  streamControl,
} from "../gateway/relay.ts";
import { serveHop } from "../gateway/stream-hop.ts";
import { heartbeatsReceived } from "../services/agent-messages/heartbeat.ts";
import { hostDisconnected } from "../services/agent-messages/hello.ts";
import {
  type AgentLink,
  handleAgentMessage,
  readAgentFrame,
} from "../services/agent-messages/index.ts";
import { AgentMessageQueue, MAX_QUEUED } from "../services/agent-messages/queue.ts";
import type { Services } from "../services/context.ts";
import { servicesFor, workerLog } from "./scope.ts";
import {
  type CommandOutcome,
  HOST_HEADER,
  invalid,
  readBody,
  SessionHost,
} from "./session-protocol.ts";
import {
  type Bindings,
  type CfWebSocket,
  type DurableObjectState,
  upgraded,
  WebSocketPair,
} from "./types.ts";

interface Attachment {
  host: SessionHost;
  connectedAt: string;
  hello: boolean;
}

/** How long a /command request waits for the agent's result before answering "sent". */
const COMMAND_WAIT_MS = 30_000;

const log = workerLog("host-session");

export class HostSession {
  /** Agent messages are handled one at a time, in order (hello's reconciliation first). Not
   * tried again while the database is away: a failure asks the agent to reconnect at once. As
   * on Node, at most MAX_QUEUED wait; past that the agent is asked to reconnect. */
  private queue = new AgentMessageQueue(log, { retryMs: 0, maxQueued: MAX_QUEUED });
  /** Requests waiting for a result, by command id (in memory: gone with an eviction). */
  private waiting = new Map<string, () => void>();
  /** Open log streams, by stream id. */
  private logs = new Map<string, WritableStreamDefaultWriter<Uint8Array>>();
  /** Open streams (exec, cp, stat, stats) on the agent's socket, by stream id. Each keeps this
   * object in memory while its hop socket from the Worker is open (accepted, not hibernatable). */
  private relays = new Relays();

  /** This instance of the object: a new one after every eviction (hibernation). */
  private readonly incarnation = crypto.randomUUID();

  constructor(
    private state: DurableObjectState,
    private bindings: Bindings,
  ) {
    log("info", "host session loaded", {
      incarnation: this.incarnation,
      sockets: state.getWebSockets().length,
    });
  }

  async fetch(req: Request): Promise<Response> {
    const path = new URL(req.url).pathname;
    if (path === "/connect") return this.connect(req);
    if (path === "/command") {
      const read = await readBody(req, Command, "command");
      return read.ok ? this.command(read.body) : read.response;
    }
    if (path === "/stream") return this.stream(req);
    if (path === "/logs") {
      const read = await readBody(req, LogQuery, "log query");
      return read.ok ? this.openLogs(read.body) : read.response;
    }
    if (path === "/__evict" && this.bindings.SESSION_TEST_EVICT === "1") {
      // What the runtime does to an idle object, on demand: the next event gets a new instance.
      this.state.abort("evicted for a test");
    }
    return new Response("not found", { status: 404 });
  }

  private connect(req: Request): Response {
    let raw: unknown;
    try {
      raw = JSON.parse(req.headers.get(HOST_HEADER) ?? "null");
    } catch {
      return invalid("no host", "not JSON");
    }
    const parsed = SessionHost.safeParse(raw);
    if (!parsed.success) return invalid("no host", parsed.error);
    const host = parsed.data;
    for (const old of this.state.getWebSockets()) {
      // Listed until its read loop ends: it must not be taken for the agent meanwhile.
      const a = old.deserializeAttachment() as Attachment | null;
      if (a) old.serializeAttachment({ ...a, hello: false } satisfies Attachment);
      old.close(CLOSE.replaced, "replaced by a newer connection");
    }
    const pair = new WebSocketPair();
    this.state.acceptWebSocket(pair[1]);
    const attachment: Attachment = { host, connectedAt: new Date().toISOString(), hello: false };
    pair[1].serializeAttachment(attachment);
    return upgraded(pair[0]);
  }

  /** The agent's socket once it has said hello (the newest, should an old one linger). */
  private agent(): CfWebSocket | undefined {
    let best: { ws: CfWebSocket; at: string } | undefined;
    for (const ws of this.state.getWebSockets()) {
      const a = ws.deserializeAttachment() as Attachment | null;
      if (a?.hello && (!best || a.connectedAt > best.at)) best = { ws, at: a.connectedAt };
    }
    return best?.ws;
  }

  private async command(command: Command): Promise<Response> {
    const answer = (outcome: CommandOutcome) => new Response(outcome);
    const ws = this.agent();
    // Not connected: the command stays pending in Postgres and goes out on the next hello.
    if (!ws) return answer("queued");
    let timer: ReturnType<typeof setTimeout> | undefined;
    const done = new Promise<boolean>((resolve) => {
      this.waiting.set(command.id, () => resolve(true));
      timer = setTimeout(
        () => resolve(false),
        Number(this.bindings.SESSION_WAIT_MS ?? COMMAND_WAIT_MS),
      );
    });
    ws.send(encode(command));
    const ok = await done;
    clearTimeout(timer);
    this.waiting.delete(command.id);
    // The request finds the result in Postgres instead (tests wait for this line).
    if (!ok) log("info", "stopped waiting for a result", { command_id: command.id });
    return answer(ok ? "done" : "sent");
  }

  private openLogs(query: LogQuery): Response {
    const ws = this.agent();
    if (!ws) return new Response("host not connected", { status: 503 });
    const streamId = crypto.randomUUID();
    const { readable, writable } = new TransformStream<Uint8Array, Uint8Array>();
    const writer = writable.getWriter();
    this.logs.set(streamId, writer);
    // A client that goes away cancels the stream on the agent too.
    writer.closed.catch(() => {
      if (this.logs.delete(streamId)) {
        this.agent()?.send(
          encode({ v: PROTOCOL_VERSION, type: "logs_cancel", stream_id: streamId }),
        );
      }
    });
    ws.send(encode({ v: PROTOCOL_VERSION, type: "logs", stream_id: streamId, ...query }));
    return new Response(readable as unknown as ReadableStream, {
      headers: { "content-type": "application/x-ndjson" },
    });
  }

  /** A hop from the Worker (stream-hop.ts) for one stream to this host's agent. */
  private stream(req: Request): Response {
    if (req.headers.get("upgrade")?.toLowerCase() !== "websocket") {
      return new Response("expected a WebSocket upgrade", { status: 400 });
    }
    if (!this.agent()) return new Response("host not connected", { status: 503 });
    const pair = new WebSocketPair();
    const ws = pair[1];
    ws.accept();
    const hop = serveHop(
      { send: (d) => ws.send(d), close: (code, reason) => ws.close(code, reason) },
      async (open, sink) => this.openAgentStream(open, sink),
    );
    ws.addEventListener("message", (e) => hop.receive(e.data as string | ArrayBuffer));
    ws.addEventListener("close", () => hop.closed());
    ws.addEventListener("error", () => hop.closed());
    return upgraded(pair[0]);
  }

  private openAgentStream(open: StreamRequest, sink: StreamSink): StreamHandle | undefined {
    const agent = this.agent();
    const hostId = (agent?.deserializeAttachment() as Attachment | null)?.host.id;
    if (!agent || !hostId) return undefined;
    return this.relays.open(
      hostId,
      {
        control: (m) => this.agent()?.send(encode(m)),
        data: (frame) => this.agent()?.send(frame),
      },
      open,
      sink,
    );
  }

  private onLog(chunk: LogChunk): void {
    const writer = this.logs.get(chunk.stream_id);
    if (!writer) return;
    const line = (o: unknown) => new TextEncoder().encode(`${JSON.stringify(o)}\n`);
    if (chunk.lines.length > 0) {
      // Taken once the reader has pulled it: then the agent may send one more (LogsAck).
      void writer
        .write(line({ lines: chunk.lines }))
        .then(() => {
          if (!this.logs.has(chunk.stream_id)) return;
          this.agent()?.send(
            encode({
              v: PROTOCOL_VERSION,
              type: "logs_ack",
              stream_id: chunk.stream_id,
              chunks: 1,
            }),
          );
        })
        .catch(() => {});
    }
    if (chunk.done) {
      this.logs.delete(chunk.stream_id);
      void writer
        .write(line({ done: true, ...(chunk.error && { error: chunk.error }) }))
        .then(() => writer.close())
        .catch(() => {});
    }
  }

  /** Services whose gateway writes straight to this host's socket (hello's re-sends), kept for
   * the life of this instance: an object's events share one I/O context, so one database client
   * serves them all (a new instance after an eviction makes a new one). */
  private cached: Services | undefined;

  private services(): Services {
    this.cached ??= servicesFor(
      this.bindings,
      (): HostGateway => ({
        // hello's re-sends: straight to the agent's socket.
        send: (_hostId, command) => {
          const ws = this.agent();
          ws?.send(encode(command));
          return ws !== undefined;
        },
        reachesDirectly: () => true,
        openLogs: async () => undefined,
        openStream: async () => undefined,
      }),
      "host-session",
    );
    return this.cached;
  }

  webSocketMessage(ws: CfWebSocket, message: string | ArrayBuffer): Promise<void> {
    // A stream's data is live: it does not wait behind messages that need the database.
    const hostId = (ws.deserializeAttachment() as Attachment | null)?.host.id;
    if (typeof message !== "string") {
      const frame = decodeStreamData(new Uint8Array(message));
      if (frame && hostId) this.relays.data(hostId, frame);
      return Promise.resolve();
    }
    const live = streamControl(message);
    if (live) {
      if (hostId) this.relays.control(hostId, live);
      return Promise.resolve();
    }
    const text = message;
    return this.queue.push(
      { hostId, close: (code, reason) => ws.close(code, reason) },
      // The attachment is read when the message's turn comes: a hello before it may have
      // changed it.
      async () => {
        const attachment = ws.deserializeAttachment() as Attachment | null;
        if (!attachment) return;
        const link = this.link(ws, attachment);
        const msg = readAgentFrame(log, link, text);
        if (msg) await handleAgentMessage(this.services(), link, msg);
      },
    );
  }

  /** The agent-message service's view of one socket of this object. */
  private link(ws: CfWebSocket, attachment: Attachment): AgentLink {
    const hostId = attachment.host.id;
    return {
      hostId,
      connectedAt: new Date(attachment.connectedAt),
      ready: attachment.hello,
      helloArrived: (welcome) => {
        ws.serializeAttachment({ ...attachment, hello: true } satisfies Attachment);
        ws.send(encode(welcome));
        return true;
      },
      heartbeat: () =>
        heartbeatsReceived(this.services(), [hostId], (_id, code, reason) =>
          ws.close(code, reason),
        ),
      log: (chunk) => this.onLog(chunk),
      stream: (msg) => this.relays.control(hostId, msg),
      close: (code, reason) => ws.close(code, reason),
      resultRecorded: (commandId) => {
        log("info", "result recorded", {
          incarnation: this.incarnation,
          command_id: commandId,
          waiting: this.waiting.has(commandId),
        });
        this.waiting.get(commandId)?.();
      },
    };
  }

  async webSocketClose(ws: CfWebSocket): Promise<void> {
    const attachment = ws.deserializeAttachment() as Attachment | null;
    // Log streams go with the agent's connection; a replaced socket closing leaves them be.
    const current = this.agent();
    if (!current || current === ws) {
      for (const writer of this.logs.values()) {
        void writer.abort("the host disconnected").catch(() => {});
      }
      this.logs.clear();
      this.relays.endAll(undefined, "the host disconnected");
    }
    if (!attachment) return;
    // After the messages that arrived before the close: a hello still being recorded must not
    // mark the host online once this has marked it offline.
    await this.queue.drained();
    await hostDisconnected(this.services(), attachment.host.id, new Date(attachment.connectedAt));
  }

  async webSocketError(ws: CfWebSocket): Promise<void> {
    await this.webSocketClose(ws);
  }
}
