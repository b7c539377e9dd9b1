// Replicas of the Node control plane coordinate through Postgres alone: LISTEN/NOTIFY on one
// channel. What travels: wake-ups for waiters (an operation finished, an instance changed),
// "a command is waiting for host H" (the replica holding H's agent sends it), and live log
// streams relayed from that replica. Nothing on the bus is the record of anything: commands
// and state are in tables, a lost message only delays a waiter until its next poll or the
// agent's next hello.
import { randomUUID } from "node:crypto";
import { CommandError, LogQuery } from "@offshoot/shared";
import { z } from "zod";
import type { PubSub } from "../db/client.ts";
import type { Log } from "../log.ts";

export const CHANNEL = "offshoot";
/** NOTIFY payloads are limited to 8000 bytes; log lines are cut into messages below this. */
export const MAX_PAYLOAD = 7000;

export const BusMessage = z.discriminatedUnion("t", [
  /** Wake-ups, batched: every topic notified in one turn of the publisher's event loop. */
  z.object({ t: z.literal("signal"), topics: z.array(z.string()).min(1) }),
  z.object({ t: z.literal("command"), host: z.string(), op: z.string() }),
  /** An agent said hello here: any other replica still holding a session for it drops it. */
  z.object({ t: z.literal("hello"), host: z.string() }),
  z.object({
    t: z.literal("logs_open"),
    host: z.string(),
    stream: z.string(),
    query: LogQuery,
    /** The replica that wants the lines. */
    from: z.string(),
  }),
  z.object({ t: z.literal("logs_ack"), stream: z.string(), to: z.string() }),
  z.object({
    t: z.literal("logs_chunk"),
    stream: z.string(),
    to: z.string(),
    lines: z.array(z.string()),
    done: z.boolean(),
    /** The last part of one of the agent's chunks: once it is taken, the reader's replica
     * sends logs_credit (an agent's chunk may travel in several NOTIFYs). */
    credit: z.boolean().optional(),
    error: CommandError.optional(),
  }),
  z.object({ t: z.literal("logs_cancel"), host: z.string(), stream: z.string() }),
  /** The reader took one of the agent's chunks: the holder passes the credit to the agent. */
  z.object({ t: z.literal("logs_credit"), host: z.string(), stream: z.string() }),
  /** A replica has a client for a stream to `host`: the replica holding its agent answers
   * where to connect (stream_here). */
  z.object({
    t: z.literal("stream_where"),
    host: z.string(),
    stream: z.string(),
    from: z.string(),
  }),
  /** The holder's hop endpoint and a one-time token for this stream (valid a few seconds). */
  z.object({
    t: z.literal("stream_here"),
    stream: z.string(),
    to: z.string(),
    url: z.string(),
    token: z.string(),
  }),
  /** Local only, never sent: the bus listens anew after losing its connection, and whatever
   * was published meanwhile is lost — waiters re-check, held agents get their commands again. */
  z.object({ t: z.literal("resync") }),
]);
export type BusMessage = z.infer<typeof BusMessage>;

export interface Bus {
  /** This replica's id: messages addressed `to` it, and its own messages to ignore. */
  readonly replica: string;
  /** Fire and forget. Messages with the same `orderKey` arrive in the order published. */
  publish(msg: BusMessage, orderKey?: string): void;
  subscribe(handler: (msg: BusMessage) => void): void;
}

/** The bus over Postgres LISTEN/NOTIFY. */
export class PgBus implements Bus {
  readonly replica = randomUUID();
  private handlers: Array<(msg: BusMessage) => void> = [];
  private unlisten: (() => Promise<void>) | undefined;
  /** Per order key, the last publish: the next waits for it, since NOTIFYs sent on different
   * pool connections reach listeners in commit order, not in the order they were issued. */
  private tails = new Map<string, Promise<void>>();

  private constructor(
    private pubsub: PubSub,
    private log: Log,
  ) {}

  static async start(pubsub: PubSub, log: Log): Promise<PgBus> {
    const bus = new PgBus(pubsub, log);
    let listened = 0;
    bus.unlisten = await pubsub.listen(
      CHANNEL,
      (payload) => bus.receive(payload),
      () => {
        if (listened++ === 0) return;
        log("info", "bus listening again; re-checking waiters and pending commands");
        for (const h of bus.handlers) h({ t: "resync" });
      },
    );
    return bus;
  }

  publish(msg: BusMessage, orderKey?: string): void {
    if (msg.t === "resync") return;
    const payload = JSON.stringify({ from: this.replica, ...msg });
    const send = () =>
      this.pubsub.notify(CHANNEL, payload).catch((e: unknown) =>
        // Only wake-ups and live data travel here: waiters poll and agents resend on hello.
        this.log("warn", "bus publish failed", { error: String(e), t: msg.t }),
      );
    if (orderKey === undefined) {
      void send();
      return;
    }
    const tail = (this.tails.get(orderKey) ?? Promise.resolve()).then(send);
    this.tails.set(orderKey, tail);
    void tail.then(() => {
      if (this.tails.get(orderKey) === tail) this.tails.delete(orderKey);
    });
  }

  subscribe(handler: (msg: BusMessage) => void): void {
    this.handlers.push(handler);
  }

  async close(): Promise<void> {
    await this.unlisten?.();
  }

  private receive(payload: string): void {
    let raw: unknown;
    try {
      raw = JSON.parse(payload);
    } catch {
      return;
    }
    if ((raw as { from?: unknown }).from === this.replica) return;
    const parsed = BusMessage.safeParse(raw);
    if (parsed.success && parsed.data.t === "resync") return; // local only
    if (!parsed.success) {
      this.log("warn", "unreadable bus message", { issue: parsed.error.issues[0]?.message });
      return;
    }
    for (const h of this.handlers) h(parsed.data);
  }
}

/** Splits lines into chunks whose JSON stays under the NOTIFY limit, counted in UTF-8 bytes
 * as Postgres counts it (a longer line is cut). */
export function chunkLines(lines: string[], budget = MAX_PAYLOAD - 300): string[][] {
  const out: string[][] = [];
  let cur: string[] = [];
  let size = 0;
  const bytes = (line: string) => Buffer.byteLength(JSON.stringify(line)) + 1;
  for (const raw of lines) {
    let line = raw;
    // Cut by characters until the escaped UTF-8 form fits (escapes and multi-byte characters
    // can make it several times longer than the string).
    while (bytes(line) > budget / 2) line = line.slice(0, Math.floor(line.length / 2));
    const cost = bytes(line);
    if (size + cost > budget && cur.length > 0) {
      out.push(cur);
      cur = [];
      size = 0;
    }
    cur.push(line);
    size += cost;
  }
  if (cur.length > 0) out.push(cur);
  return out;
}
