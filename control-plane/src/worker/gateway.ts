// HostGateway on Workers: a host's agent is held by its HostSession Durable Object (one per
// host, named by the host id). A command goes to the object, which sends it on the agent's
// socket and answers once the agent's result is recorded, so the waiting request wakes at once
// (without that answer — an evicted object, a timeout — the request finds the result in
// Postgres on its next poll).
import type { Command, CommandError, LogQuery } from "@offshoot/shared";
import type { HostGateway, LogSink } from "../gateway/host-gateway.ts";
import type { StreamHandle, StreamRequest, StreamSink } from "../gateway/relay.ts";
import { openHop } from "../gateway/stream-hop.ts";
import type { Log } from "../log.ts";
import { topics } from "../services/context.ts";
import type { Signals } from "../services/signals.ts";
import { CommandOutcome, LogStreamLine, MAX_LOG_LINE_CHARS } from "./session-protocol.ts";
import type { Bindings, CfWebSocket, ExecutionContext } from "./types.ts";

export const SESSION_URL = "https://host-session";

export function sessionStub(bindings: Bindings, hostId: string) {
  return bindings.HOST_SESSION.get(bindings.HOST_SESSION.idFromName(hostId));
}

export class WorkersGateway implements HostGateway {
  constructor(
    private bindings: Bindings,
    private ctx: Pick<ExecutionContext, "waitUntil">,
    private signals: Signals,
    private log: Log,
  ) {}

  /** The command goes to the host's HostSession as it is. */
  reachesDirectly(_hostId: string): boolean {
    return true;
  }

  send(hostId: string, command: Command): boolean {
    const delivered = sessionStub(this.bindings, hostId)
      .fetch(`${SESSION_URL}/command`, { method: "POST", body: JSON.stringify(command) })
      .then(async (res) => {
        const answer = await res.text();
        const outcome = CommandOutcome.safeParse(answer);
        if (!outcome.success) {
          this.log("warn", "host session refused the command", {
            op: command.id,
            status: res.status,
            answer: answer.slice(0, 200),
          });
        } else if (outcome.data === "done") this.signals.notify(topics.operation(command.id));
      })
      .catch((e: unknown) =>
        this.log("warn", "command not handed to the host session", {
          op: command.id,
          error: String(e),
        }),
      );
    this.ctx.waitUntil(delivered);
    return true;
  }

  /** A hop (stream-hop.ts) to the host's HostSession, which relays to the agent's socket. */
  async openStream(
    hostId: string,
    req: StreamRequest,
    sink: StreamSink,
  ): Promise<StreamHandle | undefined> {
    const res = await sessionStub(this.bindings, hostId).fetch(`${SESSION_URL}/stream`, {
      headers: { upgrade: "websocket" },
    });
    const ws = (res as unknown as { webSocket?: CfWebSocket | null }).webSocket;
    if (!ws) {
      await res.body?.cancel();
      return undefined;
    }
    ws.accept();
    const hop = openHop(
      { send: (d) => ws.send(d), close: (code, reason) => ws.close(code, reason) },
      hostId,
      req,
      sink,
    );
    ws.addEventListener("message", (e) => hop.receive(e.data as string | ArrayBuffer));
    ws.addEventListener("close", () => hop.closed());
    ws.addEventListener("error", () => hop.closed());
    return hop;
  }

  async openLogs(
    hostId: string,
    query: LogQuery,
    sink: LogSink,
  ): Promise<(() => void) | undefined> {
    const res = await sessionStub(this.bindings, hostId).fetch(`${SESSION_URL}/logs`, {
      method: "POST",
      body: JSON.stringify(query),
    });
    if (res.status !== 200 || !res.body) {
      if (res.status === 400) {
        this.log("warn", "host session refused the log query", { answer: await res.text() });
      } else {
        await res.body?.cancel();
      }
      return undefined;
    }
    const reader = (res.body as unknown as ReadableStream<Uint8Array>)
      .pipeThrough(new TextDecoderStream())
      .getReader();
    let ended = false;
    const end = (error?: CommandError) => {
      if (ended) return;
      ended = true;
      sink.end(error);
    };
    const pump = async () => {
      for await (const line of ndjson(reader)) {
        // Read on only once the reader took these (backpressure through the object).
        if ("lines" in line) {
          if (line.lines.length > 0) await sink.lines(line.lines);
        } else return end(line.error);
      }
      end();
    };
    this.ctx.waitUntil(
      pump().catch((e: unknown) => end({ code: "host_unavailable", message: String(e) })),
    );
    return () => {
      void reader.cancel().catch(() => {});
      end();
    };
  }
}

/** The lines of a HostSession's log stream, each checked; a line longer than any the object
 * writes (MAX_LOG_LINE_CHARS), or one that is not a stream line, ends the stream with an error. */
async function* ndjson(reader: ReadableStreamDefaultReader<string>): AsyncGenerator<LogStreamLine> {
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
      const text = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (text.length > MAX_LOG_LINE_CHARS) throw new Error("log stream line too long");
      const parsed = LogStreamLine.safeParse(JSON.parse(text));
      if (!parsed.success) throw new Error(`malformed log stream line: ${parsed.error.message}`);
      yield parsed.data;
    }
    if (buf.length > MAX_LOG_LINE_CHARS) throw new Error("log stream line too long");
  }
}
