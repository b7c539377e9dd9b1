// One more hop for a stream, when the process that has the client is not the one holding the
// host's agent: a Worker and the host's HostSession object, or a Node replica and the replica the
// agent is connected to. The hop is a WebSocket carrying one stream, in the agent tunnel's own
// terms (shared/src/tunnel.ts): the near side opens it with stream_open and is a Relay, as if the
// far side were the agent; the far side serves it from the agent's socket it holds. Credit works
// across the hop as it does on the agent's socket: nothing is read faster than the next hop takes.
import {
  decodeStreamData,
  encodeStreamData,
  PROTOCOL_VERSION,
  STREAM_LIMITS,
  type StreamEnd,
  StreamOpen,
} from "@offshoot/shared";
import {
  Relay,
  type StreamHandle,
  type StreamRequest,
  type StreamSink,
  streamControl,
  streamControlOf,
} from "./relay.ts";

/** A WebSocket as both runtimes offer one. */
export interface HopSocket {
  send(data: string | Uint8Array<ArrayBuffer>): void;
  close(code: number, reason: string): void;
}

/** The stream id used on a hop: it carries one stream. */
const HOP_STREAM = "hop";

/** The near side: a stream to `hostId` through `socket` (already open). Feed it the socket's
 * messages (`receive`) and its close (`closed`). */
export function openHop(
  socket: HopSocket,
  hostId: string,
  req: StreamRequest,
  sink: StreamSink,
): StreamHandle & {
  receive(data: string | ArrayBuffer | Uint8Array): void;
  closed(): void;
} {
  const relay = new Relay(
    HOP_STREAM,
    hostId,
    {
      control: (m) => socket.send(JSON.stringify(m)),
      data: (frame) => socket.send(frame),
    },
    sink,
  );
  relay.start(req);
  return {
    send: (text, payload) => relay.send(text, payload),
    close: () => {
      relay.close();
      socket.close(1000, "stream closed");
    },
    receive: (data) => {
      if (typeof data === "string") {
        const msg = streamControl(data);
        if (msg?.type === "stream_credit") relay.credited(msg.bytes);
        else if (msg?.type === "stream_end") relay.ended(msg.reason, msg.error);
        return;
      }
      const frame = decodeStreamData(data instanceof Uint8Array ? data : new Uint8Array(data));
      if (frame) relay.fromAgent(frame.text, frame.payload);
    },
    closed: () =>
      relay.ended(undefined, {
        code: "host_unavailable",
        message: "the stream's relay to the host went away",
      }),
  };
}

/** The far side: serves the stream a hop's first message asks for, with `open` (the local
 * gateway's). Returns what to feed the socket's messages and close to. */
export function serveHop(
  socket: HopSocket,
  open: (req: StreamRequest, sink: StreamSink) => Promise<StreamHandle | undefined>,
  expected?: (req: StreamRequest) => boolean,
): { receive(data: string | ArrayBuffer | Uint8Array): void; closed(): void } {
  let handle: StreamHandle | undefined;
  let ended = false;
  /** Messages for the near side, each resolved once it has credited them. */
  const delivering: Array<{ bytes: number; done: () => void }> = [];
  let credit = 0;
  const settle = () => {
    while (delivering.length > 0 && credit >= (delivering[0]?.bytes ?? 0)) {
      const d = delivering.shift();
      if (!d) break;
      credit -= d.bytes;
      d.done();
    }
  };
  const end = (reason?: string, error?: StreamEnd["error"]) => {
    if (ended) return;
    ended = true;
    socket.send(
      JSON.stringify({
        v: PROTOCOL_VERSION,
        type: "stream_end",
        stream_id: HOP_STREAM,
        ...(reason && { reason }),
        ...(error && { error }),
      }),
    );
    socket.close(1000, "stream ended");
    for (const d of delivering.splice(0)) d.done();
  };
  const sink: StreamSink = {
    message: (text, payload) =>
      new Promise<void>((resolve) => {
        if (ended) return resolve();
        delivering.push({ bytes: payload.length, done: resolve });
        socket.send(encodeStreamData({ streamId: HOP_STREAM, text, payload }));
        settle();
      }),
    end,
  };
  let pending: Promise<void> = Promise.resolve();
  return {
    receive: (data) => {
      if (typeof data === "string") {
        let raw: unknown;
        try {
          raw = JSON.parse(data);
        } catch {
          return end(undefined, { code: "invalid_request", message: "not JSON" });
        }
        const opening = StreamOpen.safeParse(raw);
        if (opening.success && !handle && !ended) {
          const { instance_id, kind, query } = opening.data;
          const req: StreamRequest = { instance_id, kind, ...(query && { query }) };
          if (expected && !expected(req)) {
            return end(undefined, { code: "unauthorized", message: "not the stream asked for" });
          }
          pending = open(req, sink).then((h) => {
            if (!h)
              return end(undefined, {
                code: "host_unavailable",
                message: "the host is not connected here",
              });
            handle = h;
            if (ended) h.close();
          });
          return;
        }
        const msg = streamControlOf(raw);
        if (!msg) return;
        if (msg.type === "stream_credit") {
          credit += msg.bytes;
          settle();
        } else {
          ended = true;
          handle?.close();
          socket.close(1000, "stream closed");
        }
        return;
      }
      const frame = decodeStreamData(data instanceof Uint8Array ? data : new Uint8Array(data));
      if (!frame) return;
      const bytes = frame.payload.length;
      // In order, after the stream is open; credited once the agent's side took it.
      pending = pending
        .then(() => handle?.send(frame.text, frame.payload))
        .then(() => {
          if (bytes > 0 && !ended)
            socket.send(
              JSON.stringify({
                v: PROTOCOL_VERSION,
                type: "stream_credit",
                stream_id: HOP_STREAM,
                bytes: Math.min(bytes, STREAM_LIMITS.window),
              }),
            );
        })
        .catch(() => {});
    },
    closed: () => {
      if (ended) return;
      ended = true;
      handle?.close();
      for (const d of delivering.splice(0)) d.done();
    },
  };
}
