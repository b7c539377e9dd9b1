import { randomUUID } from "node:crypto";
import { CLOSE, type Command, type LogChunk, PROTOCOL_VERSION } from "@offshoot/shared";
import type { Services } from "../services/context.ts";
import { hostDisconnected, recordHeartbeats } from "../services/hosts.ts";
import { AgentSession, type AgentSocket } from "./agent-session.ts";
import type { HostGateway, LogQuery, LogSink } from "./host-gateway.ts";

/**
 * The Node gateway: agent sessions held in this process. Commands for a host whose agent is
 * connected elsewhere (or nowhere) stay pending in Postgres and go out on its next hello.
 */
export class NodeGateway implements HostGateway {
  private sessions = new Map<string, AgentSession>();
  private beats = new Set<string>();
  private logStreams = new Map<string, { hostId: string; sink: LogSink }>();
  private flushTimer: NodeJS.Timeout | undefined;
  private services: Services | undefined;

  bind(services: Services): void {
    this.services = services;
    this.flushTimer = setInterval(() => void this.flushHeartbeats(), 1000);
    this.flushTimer.unref();
  }

  private get s(): Services {
    if (!this.services) throw new Error("gateway used before bind()");
    return this.services;
  }

  send(hostId: string, command: Command): boolean {
    const session = this.sessions.get(hostId);
    if (!session?.ready) return false;
    session.send(command);
    return true;
  }

  openLogs(hostId: string, query: LogQuery, sink: LogSink): (() => void) | undefined {
    const session = this.sessions.get(hostId);
    if (!session?.ready) return undefined;
    const streamId = randomUUID();
    this.logStreams.set(streamId, { hostId, sink });
    session.sendMessage({ v: PROTOCOL_VERSION, type: "logs", stream_id: streamId, ...query });
    return () => {
      if (!this.logStreams.delete(streamId)) return;
      this.sessions.get(hostId)?.sendMessage({
        v: PROTOCOL_VERSION,
        type: "logs_cancel",
        stream_id: streamId,
      });
    };
  }

  private onLog(hostId: string, chunk: LogChunk): void {
    const stream = this.logStreams.get(chunk.stream_id);
    if (!stream || stream.hostId !== hostId) return;
    if (chunk.lines.length > 0) stream.sink.lines(chunk.lines);
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
      },
      onHeartbeat: (hostId) => this.beats.add(hostId),
      onLog: (hostId, chunk) => this.onLog(hostId, chunk),
    });
    return session;
  }

  /** The transport saw the socket close. */
  closed(session: AgentSession): void {
    session.ended();
    if (this.sessions.get(session.host.id) !== session) return;
    this.sessions.delete(session.host.id);
    for (const [id, stream] of this.logStreams) {
      if (stream.hostId !== session.host.id) continue;
      this.logStreams.delete(id);
      stream.sink.end({ code: "host_unavailable", message: "the host disconnected" });
    }
    hostDisconnected(this.s, session.host.id, session.connectedAt).catch((e: unknown) =>
      this.s.log("error", "recording disconnect failed", {
        host_id: session.host.id,
        error: String(e),
      }),
    );
    this.s.log("info", "host disconnected", { host_id: session.host.id });
  }

  private async flushHeartbeats(): Promise<void> {
    if (this.beats.size === 0) return;
    const ids = [...this.beats];
    this.beats.clear();
    try {
      const offline = await recordHeartbeats(this.s, ids);
      // Marked offline by a sweep (a stall longer than the grace period): their instances are
      // Unknown until a hello reconciles them, so ask those agents for one.
      for (const id of offline)
        this.sessions.get(id)?.close(CLOSE.resync, "host was marked offline");
    } catch (e) {
      for (const id of ids) this.beats.add(id);
      this.s.log("error", "heartbeat flush failed; will retry", { error: String(e) });
    }
  }

  async close(): Promise<void> {
    clearInterval(this.flushTimer);
    for (const session of this.sessions.values())
      session.close(CLOSE.shuttingDown, "control plane shutting down");
    this.sessions.clear();
    await this.flushHeartbeats();
  }
}
