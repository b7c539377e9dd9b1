// What an agent's messages do, whichever transport carried them (Node's sessions, the Workers
// HostSession): a frame is decoded and checked here, then each message type has its file
// (hello.ts, heartbeat.ts, result.ts, event.ts; image_progress in ../images.ts), and queue.ts records them in order, tried again
// while the database is away. A transport keeps only its socket, its storage and its sending.

import {
  AgentMessage,
  CLOSE,
  type LogChunk,
  PROTOCOL_VERSION,
  type StreamCredit,
  type StreamEnd,
  type Welcome,
} from "@offshoot/shared";
import type { Log } from "../../log.ts";
import type { Services } from "../context.ts";
import { imageProgress } from "../images.ts";
import { eventReceived } from "./event.ts";
import { hostConnected, welcome } from "./hello.ts";
import { memoryReported } from "./memory.ts";
import { resultReceived } from "./result.ts";

/**
 * One agent frame, parsed and checked against the protocol. A frame that is not JSON, or of
 * another protocol version, ends the connection (`close`); a malformed message of our version
 * is only dropped.
 */
function decodeAgentMessage(
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

/** One agent connection, as its transport offers it to the message handlers. */
export interface AgentLink {
  readonly hostId: string;
  /** When the socket was accepted: a disconnect recorded later for an older one is ignored. */
  readonly connectedAt: Date;
  /** A hello has been accepted on this connection. */
  readonly ready: boolean;
  /** A hello arrived. The transport sends `welcome` and makes this connection the host's, or
   * answers false when its socket is already gone: then the hello is not recorded. Node's
   * sessions welcome only a connection's first hello; the HostSession welcomes every hello. */
  helloArrived(welcome: Welcome): boolean;
  /** Heartbeats need no transaction of their own: the transport records them (batched, or
   * with heartbeatsReceived at once). */
  heartbeat(): void | Promise<void>;
  /** Log chunks are live data for the stream's reader, never recorded. */
  log(chunk: LogChunk): void;
  /** A stream's credit or end (tunnel.ts): live data too. */
  stream(msg: StreamCredit | StreamEnd): void;
  close(code: number, reason: string): void;
  /** A result was recorded: a request waiting on this transport for it may answer. */
  resultRecorded?(commandId: string): void;
}

/**
 * A frame from the agent: its message, or undefined when it was malformed (logged, and the
 * connection closed when the protocol says so).
 */
export function readAgentFrame(
  log: Log,
  link: Pick<AgentLink, "hostId" | "close">,
  text: string,
): AgentMessage | undefined {
  const decoded = decodeAgentMessage(text);
  if (decoded.ok) return decoded.msg;
  log("warn", "bad agent message", { host_id: link.hostId, issue: decoded.issue });
  if (decoded.close) link.close(...decoded.close);
  return undefined;
}

/** Applies one agent message. Every message is idempotent to record, so it may be run again. */
export async function handleAgentMessage(
  s: Services,
  link: AgentLink,
  msg: AgentMessage,
): Promise<void> {
  if (msg.type === "hello") {
    if (link.helloArrived(welcome(s, link.hostId))) {
      await hostConnected(s, link.hostId, msg, link.connectedAt);
    }
    return;
  }
  // Until its hello has reconciled the host's rows, nothing the agent reports can be placed.
  if (!link.ready) {
    link.close(CLOSE.badProtocol, "hello first");
    return;
  }
  switch (msg.type) {
    case "heartbeat":
      await link.heartbeat();
      return;
    case "memory":
      await memoryReported(s, link.hostId, msg);
      return;
    case "log":
      link.log(msg);
      return;
    case "result":
      await resultReceived(s, link.hostId, msg);
      link.resultRecorded?.(msg.command_id);
      return;
    case "event":
      await eventReceived(s, link.hostId, msg);
      return;
    case "image_progress":
      await imageProgress(s.db, link.hostId, msg);
      return;
    case "stream_credit":
    case "stream_end":
      link.stream(msg);
      return;
  }
}
