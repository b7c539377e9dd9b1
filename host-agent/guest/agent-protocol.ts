// The protocol between the host agent and the guest agent (agent.c beside this file, installed as
// /bin/offshoot-agent), defined once. protocol.test.ts holds agent.c to it.
//
// The transport is a byte stream: a virtio-serial port named AGENT_PORT, reached on the host
// through the unix socket QEMU listens on (vsock would serve the same bytes where it exists).
// Everything on it is a frame: a 9-byte header (type u8, stream u32 BE, length u32 BE) and at
// most MAX_PAYLOAD bytes. A connection starts with the host's HELLO, carrying a nonce; the guest
// ends every session it had (a new connection, a restored or forked guest) and answers HELLO with
// HELLO_TEXT + the nonce, which is where the host starts reading frames (bytes queued before it
// belong to an older connection).
//
// A stream is one request (exec or stat) the host opens with OPEN. Its payload, and EXIT's and
// STAT's, are tagged fields: a tag byte, the value, a NUL.
//
// Flow control, both directions per stream: the guest sends at most OUT_WINDOW bytes of output
// before the host returns credit (CREDIT, u32 bytes), and the host at most IN_WINDOW bytes of
// stdin before the guest returns it. Credit goes back only once the bytes have gone on (to the
// control plane; into the command's stdin), so a stalled reader stalls its own command only.

export const AGENT_PORT = "offshoot.agent";
export const HEADER_BYTES = 9;
export const MAX_PAYLOAD = 65536;
/** Output a session may have in flight to the host. */
export const OUT_WINDOW = 256 * 1024;
/** Stdin the host may send a session ahead of the guest's credit. */
export const IN_WINDOW = 64 * 1024;
/** Sessions (exec) a guest runs at once; more are refused. */
export const MAX_SESSIONS = 64;
export const HELLO_TEXT = "offshoot-agent 1 ";
/** A command the guest ended at its timeout exits with this code. */
export const TIMEOUT_EXIT_CODE = 124;

/** Frame types the host sends. */
export const HOST = {
  hello: 1,
  open: 2,
  stdin: 3,
  /** Close the command's stdin (on a terminal: ^D). */
  eof: 4,
  /** rows u16 BE, cols u16 BE. */
  resize: 5,
  credit: 6,
  /** End the session now: its processes are killed; nothing more is sent for it. */
  kill: 7,
} as const;

/** Frame types the guest sends. */
export const GUEST = {
  hello: 1,
  stdout: 16,
  stderr: 17,
  credit: 18,
  /** The session ended: EXIT_FIELDS. */
  exit: 19,
  /** A stat's answer: STAT_FIELDS. */
  stat: 20,
} as const;

/** OPEN's fields. `argv` and `env` repeat. */
export const OPEN_FIELDS = {
  op: "o",
  argv: "a",
  /** `KEY=VALUE`, over the image's environment. */
  env: "e",
  cwd: "d",
  tty: "t",
  rows: "r",
  cols: "c",
  /** Seconds; 0: none. */
  timeout: "T",
  path: "p",
  follow: "f",
} as const;

export const EXIT_FIELDS = { code: "x", error: "e", timedOut: "t" } as const;

export const STAT_FIELDS = {
  exists: "E",
  /** d, f, l (symlink) or o (other). */
  kind: "k",
  mode: "m",
  size: "s",
  linkTarget: "l",
  error: "x",
} as const;

export type Fields = Map<string, string[]>;

export function encodeFields(fields: ReadonlyArray<readonly [string, string]>): Buffer {
  const parts: Buffer[] = [];
  for (const [tag, value] of fields) {
    if (value.includes("\0")) throw new Error(`field ${tag} contains a NUL byte`);
    parts.push(Buffer.from(tag), Buffer.from(value), Buffer.from([0]));
  }
  return Buffer.concat(parts);
}

export function decodeFields(payload: Buffer): Fields {
  const out: Fields = new Map();
  let i = 0;
  while (i < payload.length) {
    const tag = String.fromCharCode(payload[i] ?? 0);
    const end = payload.indexOf(0, i + 1);
    if (end < 0) break;
    const value = payload.subarray(i + 1, end).toString("utf8");
    out.set(tag, [...(out.get(tag) ?? []), value]);
    i = end + 1;
  }
  return out;
}

export function encodeFrame(type: number, stream: number, payload: Buffer = Buffer.alloc(0)) {
  if (payload.length > MAX_PAYLOAD) throw new Error(`a frame carries at most ${MAX_PAYLOAD} bytes`);
  const header = Buffer.alloc(HEADER_BYTES);
  header.writeUInt8(type, 0);
  header.writeUInt32BE(stream, 1);
  header.writeUInt32BE(payload.length, 5);
  return Buffer.concat([header, payload]);
}

export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}
