// Streams on the agent's WebSocket: exec sessions, copies and one-shot guest queries, many at once
// beside the host's commands. A stream is a relayed WebSocket: the control plane opens it
// (stream_open), then both sides pass whole messages, text or binary, as binary frames tagged
// with the stream's id; the agent speaks the client's protocol (Hypeman's exec and cp) itself, so
// the control plane only authenticates, places and relays.
//
// Flow control is per stream and per direction, in bytes of message payload: a side may have at
// most STREAM_LIMITS.window bytes unacknowledged, and the receiver returns credit (stream_credit)
// only once the bytes have gone on (into the client's socket, into the guest). A slow or stalled
// reader stalls its own stream, never the socket: the sender keeps what it may not send yet in
// that stream's own queue, and the agent sends stream data only while the socket's buffer is
// short (STREAM_LIMITS.socketBufferBytes), so heartbeats, results and commands wait behind at
// most that much bulk.
import { z } from "zod";

export const STREAM_LIMITS = {
  /** Bytes a side may send on a stream ahead of the other side's credit. */
  window: 256 * 1024,
  /** The largest message a stream carries; bigger binary messages are split, bigger text
   * messages refused. */
  messageBytes: 64 * 1024,
  /** Streams open at once on one agent's socket. */
  perHost: 1024,
  /** Stream data the agent lets the socket buffer before it waits for the buffer to drain. */
  socketBufferBytes: 1024 * 1024,
} as const;

export const StreamId = z
  .string()
  .min(1)
  .max(64)
  .regex(/^[A-Za-z0-9_-]+$/);

export const StreamKind = z.enum(["exec", "cp", "stat", "stats"]);
export type StreamKind = z.infer<typeof StreamKind>;

/** Control plane → agent: a new stream. stat's query travels in `query`. */
export const StreamOpen = z.object({
  v: z.literal(1),
  type: z.literal("stream_open"),
  stream_id: StreamId,
  instance_id: z.string().max(64),
  kind: StreamKind,
  query: z.object({ path: z.string().max(4096), follow_links: z.boolean() }).optional(),
});
export type StreamOpen = z.infer<typeof StreamOpen>;

/** Either way: the receiver passed `bytes` on; the sender may send that many more. */
export const StreamCredit = z.object({
  v: z.literal(1),
  type: z.literal("stream_credit"),
  stream_id: StreamId,
  bytes: z.number().int().positive().max(STREAM_LIMITS.window),
});
export type StreamCredit = z.infer<typeof StreamCredit>;

/** A stream's message in a binary WebSocket frame: [flags u8][id length u8][id][payload]. */
export interface StreamData {
  streamId: string;
  text: boolean;
  payload: Uint8Array;
}

const TEXT_FLAG = 1;

export function encodeStreamData(d: StreamData): Uint8Array<ArrayBuffer> {
  const id = new TextEncoder().encode(d.streamId);
  const out = new Uint8Array(2 + id.length + d.payload.length);
  out[0] = d.text ? TEXT_FLAG : 0;
  out[1] = id.length;
  out.set(id, 2);
  out.set(d.payload, 2 + id.length);
  return out;
}

export function decodeStreamData(frame: Uint8Array): StreamData | undefined {
  if (frame.length < 2) return undefined;
  const idLength = frame[1] ?? 0;
  if (idLength === 0 || frame.length < 2 + idLength) return undefined;
  const streamId = new TextDecoder().decode(frame.subarray(2, 2 + idLength));
  if (!StreamId.safeParse(streamId).success) return undefined;
  return {
    streamId,
    text: ((frame[0] ?? 0) & TEXT_FLAG) !== 0,
    payload: frame.subarray(2 + idLength),
  };
}

// ---- Hypeman's exec protocol (GET /instances/{id}/exec, a WebSocket) --------------------------

/** The client's first message: a JSON text frame. */
export const ExecStart = z.object({
  command: z
    .array(z.string().max(64 * 1024))
    .max(1024)
    .default([]),
  tty: z.boolean().default(false),
  env: z
    .record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/), z.string().max(32 * 1024))
    .default({}),
  cwd: z.string().max(4096).default(""),
  /** Seconds; 0: none. */
  timeout: z
    .number()
    .int()
    .nonnegative()
    .max(86_400 * 7)
    .default(0),
  /** Seconds to wait for the guest agent to answer. */
  wait_for_agent: z.number().int().nonnegative().max(300).default(0),
  rows: z.number().int().nonnegative().max(0xffff).default(0),
  cols: z.number().int().nonnegative().max(0xffff).default(0),
});
export type ExecStart = z.infer<typeof ExecStart>;

/** A text message `{"resize":{"rows":R,"cols":C}}` resizes a terminal; any other text or binary
 * message is stdin. */
export const ExecResize = z.object({
  resize: z.object({
    rows: z.number().int().positive().max(0xffff),
    cols: z.number().int().positive().max(0xffff),
  }),
});

/** An extension: a text message `{"close_stdin":true}` ends the command's stdin (on a terminal,
 * ^D), so a program that reads to the end of its input can finish while its output is still
 * read. Hypeman's protocol has no end of stdin short of closing the socket. */
export const ExecCloseStdin = z.object({ close_stdin: z.literal(true) });

/** The last message of an exec: a JSON text frame. */
export const execExit = (code: number) => JSON.stringify({ exitCode: code });

// ---- stat and stats ---------------------------------------------------------------------------

/** What the host measures of an instance's VMM (the control plane adds names and allocations). */
export const VmmStats = z.object({
  cpu_seconds: z.number().nonnegative(),
  memory_rss_bytes: z.number().int().nonnegative(),
  memory_vms_bytes: z.number().int().nonnegative(),
  network_rx_bytes: z.number().int().nonnegative(),
  network_tx_bytes: z.number().int().nonnegative(),
});
export type VmmStats = z.infer<typeof VmmStats>;

// ---- Hypeman's cp protocol (GET /instances/{id}/cp, a WebSocket) ------------------------------

/**
 * The client's first message. `to`: binary messages of the file's bytes, then
 * `{"type":"end"}`; the answer is `{"type":"result","success":…,"bytes_written":N,"error":…}`.
 * `from`: for each entry a `{"type":"header",…}`, its bytes as binary messages, then
 * `{"type":"end","final":bool}`; `{"type":"error","message":…}` ends a failed copy. An extension,
 * `archive: "tar"`, copies a whole tree as one tar stream instead: into `guest_path` (a directory,
 * made if missing) for `to`; of `guest_path` for `from`, ending `{"type":"end","final":true}`.
 */
export const CpStart = z.object({
  direction: z.enum(["to", "from"]),
  guest_path: z.string().min(1).max(4096),
  is_dir: z.boolean().default(false),
  mode: z.number().int().min(0).max(0o7777).default(0),
  follow_links: z.boolean().default(false),
  src_basename: z.string().max(255).optional(),
  uid: z.number().int().nonnegative().default(0),
  gid: z.number().int().nonnegative().default(0),
  archive: z.literal("tar").optional(),
});
export type CpStart = z.infer<typeof CpStart>;

/** What ends a `to` copy's data. */
export const CpEnd = z.object({ type: z.literal("end") });
