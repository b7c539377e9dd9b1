import { randomBytes, randomUUID } from "node:crypto";
import {
  AGENT_LIMITS,
  CLOSE,
  type Command,
  type LogChunk,
  type LogQuery,
  PROTOCOL_VERSION,
} from "@offshoot/shared";
import { eq } from "drizzle-orm";
import WebSocket from "ws";
import { isConnectionLost } from "../db/client.ts";
import { hosts } from "../db/schema/index.ts";
import { heartbeatsReceived } from "../services/agent-messages/heartbeat.ts";
import { hostDisconnected } from "../services/agent-messages/hello.ts";
import { type Bus, type BusMessage, chunkLines } from "../services/bus.ts";
import type { Services } from "../services/context.ts";
import { commandOf } from "../services/operations.ts";
import { AgentSession, type AgentSocket } from "./agent-session.ts";
import type { HostGateway, LogSink } from "./host-gateway.ts";
import { Relays, type StreamHandle, type StreamRequest, type StreamSink } from "./relay.ts";
import { openHop, serveHop } from "./stream-hop.ts";

/** How long a replica waits for the one holding a host's agent to take a log stream (or to say
 * where to open a stream). */
const REMOTE_LOGS_TIMEOUT_MS = 3_000;
/** Where replicas connect to each other for a stream (stream-hop.ts). */
export const HOP_PATH = "/internal/v1/stream-hop";
/** How long a hop's one-time token is good for. */
const HOP_TOKEN_MS = 10_000;

/**
 * The Node gateway: agent sessions held in this process. With a bus (replicas sharing one
 * Postgres server), a command for a host whose agent is connected to another replica is
 * announced there and that replica sends it; log streams are relayed the same way. Commands
 * for a host connected nowhere stay pending in Postgres and go out on its next hello.
 */
export class NodeGateway implements HostGateway {
  private sessions = new Map<string, AgentSession>();
  private beats = new Set<string>();
  /** Streams from agents held here. `relayed`: read on another replica, which sends the credit
   * for each chunk over the bus (logs_credit); otherwise this one acks once the sink took it. */
  private logStreams = new Map<string, { hostId: string; sink: LogSink; relayed: boolean }>();
  /** Streams this replica asked another one for: acked once that replica has the agent. */
  private remoteStreams = new Map<string, { hostId: string; sink: LogSink; acked(): void }>();
  /** Streams (exec, stat, stats) relayed to agents held here, by stream id. */
  private relays = new Relays();
  /** This replica's hop endpoint, the one-time tokens it issued for it, and the answers it
   * waits for from other replicas (stream_here). */
  private hopUrl: string | undefined;
  private hopTokens = new Map<string, { hostId: string; expires: number }>();
  private hopWaits = new Map<string, (at: { url: string; token: string }) => void>();
  private flushTimer: NodeJS.Timeout | undefined;
  private services: Services | undefined;

  constructor(private bus?: Bus) {
    bus?.subscribe((msg) => this.onBus(msg));
  }

  bind(services: Services): void {
    this.services = services;
    this.flushTimer = setInterval(() => void this.flushHeartbeats(), 1000);
    this.flushTimer.unref();
  }

  private get s(): Services {
    if (!this.services) throw new Error("gateway used before bind()");
    return this.services;
  }

  reachesDirectly(hostId: string): boolean {
    return this.sessions.get(hostId)?.ready === true;
  }

  send(hostId: string, command: Command): boolean {
    const session = this.sessions.get(hostId);
    if (session?.ready) {
      session.send(command);
      return true;
    }
    this.bus?.publish({ t: "command", host: hostId, op: command.id });
    return false;
  }

  async openLogs(
    hostId: string,
    query: LogQuery,
    sink: LogSink,
  ): Promise<(() => void) | undefined> {
    return this.openLocalLogs(hostId, query, sink) ?? this.openRemoteLogs(hostId, query, sink);
  }

  async openStream(
    hostId: string,
    req: StreamRequest,
    sink: StreamSink,
  ): Promise<StreamHandle | undefined> {
    return this.openLocalStream(hostId, req, sink) ?? this.openRemoteStream(hostId, req, sink);
  }

  /** Where other replicas reach this one's hop endpoint (HOP_PATH); without it, streams to
   * agents held here are not served to them. */
  setHopUrl(url: string): void {
    this.hopUrl = url;
  }

  /** The host a hop's one-time token was issued for (and the token spent), if any. */
  takeHopToken(token: string): string | undefined {
    const t = this.hopTokens.get(token);
    this.hopTokens.delete(token);
    return t && t.expires > Date.now() ? t.hostId : undefined;
  }

  /** A stream through the replica holding the host's agent: it says where (over the bus), and
   * this replica connects to it there (stream-hop.ts). */
  private async openRemoteStream(
    hostId: string,
    req: StreamRequest,
    sink: StreamSink,
  ): Promise<StreamHandle | undefined> {
    const bus = this.bus;
    if (!bus || !(await this.online(hostId))) return undefined;
    const stream = randomUUID();
    const where = await new Promise<{ url: string; token: string } | undefined>((resolve) => {
      const timer = setTimeout(() => {
        this.hopWaits.delete(stream);
        resolve(undefined);
      }, REMOTE_LOGS_TIMEOUT_MS);
      timer.unref();
      this.hopWaits.set(stream, (at) => {
        clearTimeout(timer);
        this.hopWaits.delete(stream);
        resolve(at);
      });
      bus.publish({ t: "stream_where", host: hostId, stream, from: bus.replica });
    });
    if (!where) return undefined;
    const ws = new WebSocket(new URL(HOP_PATH, where.url.replace(/^http/, "ws")), {
      headers: { authorization: `Bearer ${where.token}` },
      handshakeTimeout: REMOTE_LOGS_TIMEOUT_MS,
      maxPayload: AGENT_LIMITS.frameBytes,
    });
    const opened = await new Promise<boolean>((resolve) => {
      ws.once("open", () => resolve(true));
      ws.once("error", () => resolve(false));
    });
    if (!opened) return undefined;
    const hop = openHop(
      { send: (d) => ws.send(d), close: (code, reason) => ws.close(code, reason) },
      hostId,
      req,
      sink,
    );
    ws.on("message", (data, isBinary) => {
      const bytes = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data as ArrayBuffer);
      hop.receive(isBinary ? new Uint8Array(bytes) : bytes.toString("utf8"));
    });
    ws.on("close", () => hop.closed());
    ws.on("error", () => {});
    return hop;
  }

  private openLocalStream(
    hostId: string,
    req: StreamRequest,
    sink: StreamSink,
  ): StreamHandle | undefined {
    const session = this.sessions.get(hostId);
    if (!session?.ready) return undefined;
    return this.relays.open(
      hostId,
      { control: (m) => session.sendMessage(m), data: (f) => session.sendBinary(f) },
      req,
      sink,
    );
  }

  /** Serves a hop another replica opened with a token for `hostId` (server.ts upgrades it). */
  serveHop(hostId: string, socket: Parameters<typeof serveHop>[0]) {
    return serveHop(socket, async (req, sink) => this.openLocalStream(hostId, req, sink));
  }

  private openLocalLogs(
    hostId: string,
    query: LogQuery,
    sink: LogSink,
    streamId: string = randomUUID(),
    relayed = false,
  ): (() => void) | undefined {
    const session = this.sessions.get(hostId);
    if (!session?.ready) return undefined;
    this.logStreams.set(streamId, { hostId, sink, relayed });
    session.sendMessage({ v: PROTOCOL_VERSION, type: "logs", stream_id: streamId, ...query });
    return () => this.cancelLocal(streamId);
  }

  /** The reader took a chunk of a stream held here: the agent may send one more. */
  private credit(streamId: string): void {
    const stream = this.logStreams.get(streamId);
    if (!stream) return;
    this.sessions.get(stream.hostId)?.sendMessage({
      v: PROTOCOL_VERSION,
      type: "logs_ack",
      stream_id: streamId,
      chunks: 1,
    });
  }

  private cancelLocal(streamId: string): void {
    const stream = this.logStreams.get(streamId);
    if (!stream) return;
    this.logStreams.delete(streamId);
    this.sessions.get(stream.hostId)?.sendMessage({
      v: PROTOCOL_VERSION,
      type: "logs_cancel",
      stream_id: streamId,
    });
  }

  /** Whether the host is connected somewhere: only then is there a replica to ask for it. */
  private async online(hostId: string): Promise<boolean> {
    const [host] = await this.s.db
      .select({ status: hosts.status })
      .from(hosts)
      .where(eq(hosts.id, hostId));
    return host?.status === "online";
  }

  /** Asks the replica holding the host's agent to stream; undefined if none answers. */
  private async openRemoteLogs(
    hostId: string,
    query: LogQuery,
    sink: LogSink,
  ): Promise<(() => void) | undefined> {
    const bus = this.bus;
    if (!bus || !(await this.online(hostId))) return undefined;
    const stream = randomUUID();
    const cancel = () => {
      if (this.remoteStreams.delete(stream))
        bus.publish({ t: "logs_cancel", host: hostId, stream });
    };
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.remoteStreams.delete(stream);
        // A late ack must not leave the holder streaming to nobody.
        bus.publish({ t: "logs_cancel", host: hostId, stream });
        resolve(undefined);
      }, REMOTE_LOGS_TIMEOUT_MS);
      timer.unref();
      this.remoteStreams.set(stream, {
        hostId,
        sink,
        acked: () => {
          clearTimeout(timer);
          resolve(cancel);
        },
      });
      bus.publish({ t: "logs_open", host: hostId, stream, query, from: bus.replica });
    });
  }

  private onBus(msg: BusMessage): void {
    switch (msg.t) {
      case "command": {
        const session = this.sessions.get(msg.host);
        if (!session?.ready) return;
        // Only the id travels: the table is the record, and the channel is open to any role
        // that can connect to the database, so what is sent comes from the table (pending only).
        this.s.ops
          .get(msg.op)
          .then((op) => {
            if (op?.status === "pending" && op.kind !== "fork_flow") session.send(commandOf(op));
          })
          .catch((e: unknown) =>
            this.s.log("error", "forwarded command not sent", { op: msg.op, error: String(e) }),
          );
        return;
      }
      case "logs_open": {
        const bus = this.bus;
        if (!bus) return;
        const to = msg.from;
        const key = `logs:${msg.stream}`;
        const relay: LogSink = {
          lines: (lines) => {
            const parts = chunkLines(lines);
            parts.forEach((part, i) => {
              bus.publish(
                {
                  t: "logs_chunk",
                  stream: msg.stream,
                  to,
                  lines: part,
                  done: false,
                  ...(i === parts.length - 1 && { credit: true }),
                },
                key,
              );
            });
          },
          end: (error) =>
            bus.publish(
              {
                t: "logs_chunk",
                stream: msg.stream,
                to,
                lines: [],
                done: true,
                ...(error && { error }),
              },
              key,
            ),
        };
        if (this.openLocalLogs(msg.host, msg.query, relay, msg.stream, true)) {
          bus.publish({ t: "logs_ack", stream: msg.stream, to }, key);
        }
        return;
      }
      case "hello":
        this.sessions
          .get(msg.host)
          ?.close(CLOSE.replaced, "the agent connected to another replica");
        return;
      case "logs_cancel":
        if (this.logStreams.get(msg.stream)?.hostId === msg.host) this.cancelLocal(msg.stream);
        return;
      case "logs_credit":
        if (this.logStreams.get(msg.stream)?.hostId === msg.host) this.credit(msg.stream);
        return;
      case "logs_ack":
        if (msg.to === this.bus?.replica) this.remoteStreams.get(msg.stream)?.acked();
        return;
      case "logs_chunk": {
        if (msg.to !== this.bus?.replica) return;
        const stream = this.remoteStreams.get(msg.stream);
        if (!stream) return;
        if (msg.lines.length > 0) {
          const taken = Promise.resolve(stream.sink.lines(msg.lines));
          if (msg.credit) {
            void taken.then(
              () =>
                this.remoteStreams.has(msg.stream) &&
                this.bus?.publish({ t: "logs_credit", host: stream.hostId, stream: msg.stream }),
              () => {},
            );
          }
        }
        if (msg.done) {
          this.remoteStreams.delete(msg.stream);
          stream.sink.end(msg.error);
        }
        return;
      }
      case "stream_where": {
        const bus = this.bus;
        if (!bus || !this.hopUrl || !this.sessions.get(msg.host)?.ready) return;
        const token = randomBytes(32).toString("hex");
        const now = Date.now();
        for (const [t, v] of this.hopTokens) if (v.expires <= now) this.hopTokens.delete(t);
        this.hopTokens.set(token, { hostId: msg.host, expires: now + HOP_TOKEN_MS });
        bus.publish({
          t: "stream_here",
          stream: msg.stream,
          to: msg.from,
          url: this.hopUrl,
          token,
        });
        return;
      }
      case "stream_here":
        if (msg.to === this.bus?.replica)
          this.hopWaits.get(msg.stream)?.({ url: msg.url, token: msg.token });
        return;
      case "resync":
        // Commands announced while the bus was deaf: send what is pending to the agents here.
        for (const [hostId, session] of this.sessions) {
          if (!session.ready) continue;
          this.s.ops.resendPending(hostId).catch((e: unknown) =>
            this.s.log("error", "re-sending after a bus outage failed", {
              host_id: hostId,
              error: String(e),
            }),
          );
        }
        return;
      case "signal":
        return;
    }
  }

  private onLog(hostId: string, chunk: LogChunk): void {
    const stream = this.logStreams.get(chunk.stream_id);
    if (!stream || stream.hostId !== hostId) return;
    if (chunk.lines.length > 0) {
      const taken = Promise.resolve(stream.sink.lines(chunk.lines));
      if (!stream.relayed) {
        void taken.then(
          () => this.credit(chunk.stream_id),
          () => {},
        );
      }
    }
    if (chunk.done) {
      this.logStreams.delete(chunk.stream_id);
      stream.sink.end(chunk.error);
    }
  }

  /** A transport accepted an authenticated agent socket. */
  open(host: { id: string; name: string }, socket: AgentSocket): AgentSession {
    const session = new AgentSession(() => this.s, host, socket, {
      onHello: (sess) => {
        const previous = this.sessions.get(host.id);
        this.sessions.set(host.id, sess);
        if (previous && previous !== sess)
          previous.close(CLOSE.replaced, "replaced by a newer connection");
        // A half-open session on another replica would swallow the commands made there.
        this.bus?.publish({ t: "hello", host: host.id });
      },
      onHeartbeat: (hostId) => this.beats.add(hostId),
      onLog: (hostId, chunk) => this.onLog(hostId, chunk),
      onStream: (hostId, msg) => this.relays.control(hostId, msg),
      onStreamData: (hostId, frame) => this.relays.data(hostId, frame),
    });
    return session;
  }

  /** The transport saw the socket close. The host is recorded offline once the messages that
   * arrived before the close have been handled (see AgentSession.ended). */
  closed(session: AgentSession): void {
    const drained = session.ended();
    if (this.sessions.get(session.host.id) !== session) return;
    this.sessions.delete(session.host.id);
    for (const [id, stream] of this.logStreams) {
      if (stream.hostId !== session.host.id) continue;
      this.logStreams.delete(id);
      stream.sink.end({ code: "host_unavailable", message: "the host disconnected" });
    }
    this.relays.endAll(session.host.id, "the host disconnected");
    this.s.log("info", "host disconnected", { host_id: session.host.id });
    drained
      .then(() => hostDisconnected(this.s, session.host.id, session.connectedAt))
      .catch((e: unknown) =>
        this.s.log("error", "recording disconnect failed", {
          host_id: session.host.id,
          error: String(e),
        }),
      );
  }

  private async flushHeartbeats(): Promise<void> {
    if (this.beats.size === 0) return;
    const ids = [...this.beats];
    this.beats.clear();
    try {
      await heartbeatsReceived(this.s, ids, (id, code, reason) =>
        this.sessions.get(id)?.close(code, reason),
      );
    } catch (e) {
      if (isConnectionLost(e)) this.s.dbHealth?.failed();
      for (const id of ids) this.beats.add(id);
      this.s.log("error", "heartbeat flush failed; will retry", { error: String(e) });
    }
  }

  async close(): Promise<void> {
    clearInterval(this.flushTimer);
    for (const session of this.sessions.values())
      session.close(CLOSE.shuttingDown, "control plane shutting down");
    this.sessions.clear();
    this.relays.endAll(undefined, "the control plane is shutting down");
    // Streams relayed to other replicas end now, not never.
    for (const [id, stream] of this.logStreams) {
      this.logStreams.delete(id);
      stream.sink.end({ code: "host_unavailable", message: "the control plane is shutting down" });
    }
    await this.flushHeartbeats();
  }
}
