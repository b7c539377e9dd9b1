import {
  AgentMessage,
  CLOSE,
  type Command,
  encode,
  type Hello,
  type LogChunk,
  PROTOCOL_VERSION,
  type ServerMessage,
} from "@offshoot/shared";
import { retryWhileDatabaseAway, transaction } from "../db/client.ts";

import { type Services, topics } from "../services/context.ts";
import { hostConnected } from "../services/hosts.ts";
import { applyObserved } from "../services/operations.ts";

/** The minimum a transport gives a session: send a text frame, close the socket. */
export interface AgentSocket {
  send(text: string): void;
  close(code: number, reason: string): void;
}

const HELLO_TIMEOUT_MS = 10_000;
/** How long a message is tried again while the database is away before the agent is asked to
 * reconnect (and say hello, which re-sends what is pending). */
const DATABASE_RETRY_MS = 30_000;
/** Messages waiting to be recorded, at most, per agent (while the database is away). */
const MAX_QUEUED = 1000;

/**
 * One agent frame, parsed and checked against the protocol. A frame that is not JSON, or of
 * another protocol version, ends the connection (`close`); a malformed message of our version
 * is only dropped. Shared by every transport (Node sessions, the Workers HostSession).
 */
export function decodeAgentMessage(
  text: string,
):
  | { ok: true; msg: AgentMessage }
  | { ok: false; issue: string; close?: [code: number, reason: string] } {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    return { ok: false, issue: "not JSON", close: [CLOSE.badProtocol, "not JSON"] };
  }
  const parsed = AgentMessage.safeParse(raw);
  if (parsed.success) return { ok: true, msg: parsed.data };
  const { v, type } = (raw ?? {}) as { v?: unknown; type?: unknown };
  const first = parsed.error.issues[0];
  const issue = `v ${String(v)} ${String(type)}: ${first?.path.join(".") ?? ""} ${first?.message ?? "invalid"}`;
  if (v !== PROTOCOL_VERSION) {
    return {
      ok: false,
      issue,
      close: [CLOSE.badProtocol, `protocol version ${String(v)} not supported`],
    };
  }
  // Without a valid hello nothing else is accepted: say why now rather than time out.
  if (type === "hello")
    return { ok: false, issue, close: [CLOSE.badProtocol, issue.slice(0, 120)] };
  return { ok: false, issue };
}

/**
 * One agent connection, independent of the transport that carries it. Messages are handled
 * strictly in arrival order (hello's reconciliation before any result that follows it).
 */
export class AgentSession {
  readonly connectedAt = new Date();
  private chain: Promise<void> = Promise.resolve();
  private hello: Hello | undefined;
  private helloTimer: NodeJS.Timeout;
  /** The transport saw the socket close: nothing this session does may outlast that. */
  private gone = false;
  private queued = 0;

  constructor(
    private s: () => Services,
    readonly host: { id: string; name: string },
    private socket: AgentSocket,
    private hooks: {
      onHello(session: AgentSession): void;
      onHeartbeat(hostId: string): void;
      onLog(hostId: string, chunk: LogChunk): void;
    },
  ) {
    this.helloTimer = setTimeout(
      () => this.socket.close(CLOSE.badProtocol, "no hello"),
      HELLO_TIMEOUT_MS,
    );
  }

  get ready(): boolean {
    return this.hello !== undefined;
  }

  send(command: Command): void {
    this.socket.send(encode(command));
  }

  sendMessage(msg: ServerMessage): void {
    this.socket.send(encode(msg));
  }

  close(code: number, reason: string): void {
    clearTimeout(this.helloTimer);
    this.socket.close(code, reason);
  }

  receive(text: string): void {
    const decoded = decodeAgentMessage(text);
    if (!decoded.ok) {
      this.s().log("warn", "bad agent message", { host_id: this.host.id, issue: decoded.issue });
      if (decoded.close) this.close(...decoded.close);
      return;
    }
    const { msg } = decoded;
    // Live data needs no database: it does not wait behind a message that does.
    if (this.hello && (msg.type === "heartbeat" || msg.type === "log")) {
      this.live(msg);
      return;
    }
    if (this.queued >= MAX_QUEUED) {
      this.close(CLOSE.resync, "too many messages waiting to be recorded; reconnect");
      return;
    }
    this.queued++;
    this.chain = this.chain
      // While the database is away a message is tried again (each one is idempotent to record)
      // rather than the agent sent away to reconnect: every agent of the fleet would, at once.
      .then(() =>
        retryWhileDatabaseAway(() => this.handle(msg), {
          maxMs: DATABASE_RETRY_MS,
          stop: () => this.gone,
        }),
      )
      .catch((e: unknown) => {
        // Dropping a result or a hello would leave commands pending until the next reconnect;
        // forcing that reconnect now makes the agent say hello and the re-send recover it.
        this.s().log("error", "agent message failed; asking the agent to reconnect", {
          host_id: this.host.id,
          error: String(e),
        });
        this.close(CLOSE.resync, "message could not be recorded; reconnect");
      })
      .finally(() => {
        this.queued--;
      });
  }

  /** The socket closed. Resolves once every message received before that has been handled, so
   * that recording the disconnect comes after (a hello still being recorded would otherwise
   * mark the host online after its socket was gone). */
  ended(): Promise<void> {
    this.gone = true;
    clearTimeout(this.helloTimer);
    return this.chain;
  }

  private live(msg: Extract<AgentMessage, { type: "heartbeat" | "log" }>): void {
    if (msg.type === "heartbeat") this.hooks.onHeartbeat(this.host.id);
    else this.hooks.onLog(this.host.id, msg);
  }

  private async handle(msg: AgentMessage): Promise<void> {
    const s = this.s();
    if (msg.type === "hello") {
      clearTimeout(this.helloTimer);
      // Its socket is gone: this session must not become the host's.
      if (this.gone) return;
      if (!this.hello) {
        this.hello = msg;
        this.socket.send(
          encode({
            v: PROTOCOL_VERSION,
            type: "welcome",
            host_id: this.host.id,
            heartbeat_ms: s.env.HEARTBEAT_MS,
          }),
        );
        // Registered before reconciling, so the re-sent commands find this session.
        this.hooks.onHello(this);
      }
      await hostConnected(s, this.host.id, msg, this.connectedAt);
      return;
    }
    if (!this.hello) {
      this.close(CLOSE.badProtocol, "hello first");
      return;
    }
    switch (msg.type) {
      case "heartbeat":
      case "log":
        this.live(msg);
        return;
      case "result":
        await s.ops.complete(this.host.id, msg);
        return;
      case "event": {
        const changed = await transaction(s.db, (tx) =>
          applyObserved(tx, this.host.id, [msg.instance], "host.event"),
        );
        for (const id of changed) s.signals.notify(topics.instance(id));
        return;
      }
    }
  }
}
