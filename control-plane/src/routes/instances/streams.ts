// GET /instances/{id}/exec and /cp: Hypeman's exec and cp protocols over a WebSocket
// (shared/src/tunnel.ts names their messages). The checks answer in HTTP before the upgrade (404, 409, 503); after it, the
// control plane relays messages between the client and the stream on the host's agent, which
// speaks the protocol with the guest. The client is read only as fast as the agent takes its
// input, and the agent sends only as fast as the client's socket takes the output.
import { InvalidRequestError } from "@offshoot/shared";
import type { Context, Next } from "hono";
import type { UpgradeWebSocket, WSContext, WSEvents } from "hono/ws";
import type { InstanceRow } from "../../db/schema/index.ts";
import type { StreamHandle } from "../../gateway/relay.ts";
import type { Services } from "../../services/context.ts";
import { guestTarget, openGuestStream } from "../../services/instances/guest.ts";
import type { AppEnv, Router } from "../common.ts";

/** What Node's `ws` offers beyond Hono's socket: it says when a message has gone, and can stop
 * reading. On Workers a message counts as gone once handed to the socket, and nothing pauses. */
interface NodeSocket {
  send(data: unknown, cb: (err?: Error) => void): void;
  pause(): void;
  resume(): void;
}

function nodeSocket(raw: unknown): NodeSocket | undefined {
  const r = raw as Partial<NodeSocket> | undefined;
  return typeof r?.pause === "function" && typeof r.resume === "function"
    ? (r as NodeSocket)
    : undefined;
}

/** How long a finished cp's socket waits for its client to close it. */
const CP_CLOSE_GRACE_MS = 30_000;

/** WebSocket close reasons are at most 123 bytes. */
const closeReason = (s: string) => {
  const b = new TextEncoder().encode(s);
  return b.length <= 123 ? s : new TextDecoder().decode(b.subarray(0, 120)).replace(/\uFFFD$/, "");
};

/** The relay between a client's socket and a stream of `kind` on the instance's host. */
export function relayEvents(s: Services, row: InstanceRow, kind: "exec" | "cp"): WSEvents<unknown> {
  let handle: StreamHandle | undefined;
  let closed = false;
  /** Client messages on their way to the agent, in order; the client is not read while any
   * waits for the agent's credit. */
  let pending: Promise<void> = Promise.resolve();
  let waiting = 0;
  let opened: (h: StreamHandle | undefined) => void = () => {};
  const ready = new Promise<StreamHandle | undefined>((r) => {
    opened = r;
  });
  let started = false;
  let closer: ReturnType<typeof setTimeout> | undefined;
  /** The stream could not be opened or broke off: said in the protocol's own terms (exec:
   * `Error: …` and exit code 127, as Hypeman does; cp: an error message), then closed. */
  const fail = (ws: WSContext<unknown>, message: string) => {
    if (ws.readyState !== 1) return;
    if (kind === "exec") {
      ws.send(new TextEncoder().encode(`Error: ${message}\r\n`));
      ws.send(JSON.stringify({ exitCode: 127 }));
    } else ws.send(JSON.stringify({ type: "error", message }));
    ws.close(1011, closeReason(message));
  };
  /** Opens the stream: at the socket's open on Node; at its first message on Workers, whose
   * adapter has no open event (its socket is open from the start). */
  const start = (ws: WSContext<unknown>) => {
    if (started) return;
    started = true;
    const node = nodeSocket(ws.raw);
    openGuestStream(s, row, kind, {
      message: (text, payload) =>
        new Promise<void>((resolve) => {
          if (ws.readyState !== 1) return resolve();
          const data = text ? new TextDecoder().decode(payload) : payload;
          if (node) node.send(data, () => resolve());
          else {
            // Workers: no word of when it has gone; taken as gone.
            ws.send(data as string);
            resolve();
          }
        }),
      end: (reason, error) => {
        if (ws.readyState !== 1) return;
        if (error) fail(ws, error.message);
        else if (kind === "cp") {
          // The client closes a finished copy itself, once its last file is written (the
          // official client's cpFromInstance fails a copy whose socket closes before that);
          // past CP_CLOSE_GRACE_MS it is closed for it.
          closer = setTimeout(() => ws.close(1000, closeReason(reason ?? "")), CP_CLOSE_GRACE_MS);
        } else ws.close(1000, closeReason(reason ?? ""));
      },
    }).then(
      (h) => {
        handle = h;
        opened(h);
        if (closed) h.close();
      },
      (e: unknown) => {
        opened(undefined);
        fail(ws, e instanceof Error ? e.message : String(e));
      },
    );
  };
  return {
    onOpen: (_evt, ws) => start(ws),
    onMessage: (evt, ws) => {
      start(ws);
      const raw = nodeSocket(ws.raw);
      const text = typeof evt.data === "string";
      const payload =
        typeof evt.data === "string"
          ? new TextEncoder().encode(evt.data)
          : new Uint8Array(evt.data as ArrayBuffer);
      if (waiting++ === 0) raw?.pause();
      pending = pending
        .then(() => ready)
        .then((h) => h?.send(text, payload))
        .catch((e: unknown) => {
          ws.close(1009, closeReason(e instanceof Error ? e.message : String(e)));
        })
        .finally(() => {
          if (--waiting === 0) raw?.resume();
        });
    },
    onClose: () => {
      closed = true;
      clearTimeout(closer);
      handle?.close();
    },
  };
}

/** GET /instances/{id}/exec and /cp. */
export function registerInstanceStreams(
  app: Router,
  upgrade: UpgradeWebSocket<unknown> | undefined,
) {
  for (const kind of ["exec", "cp"] as const) {
    app.get(`/instances/:id/${kind}`, async (c: Context<AppEnv>, next: Next) => {
      const row = await guestTarget(c.var.services, c.var.tenantId, c.req.param("id") ?? "", {
        needsAgent: true,
      });
      if (!upgrade || c.req.header("upgrade")?.toLowerCase() !== "websocket") {
        throw new InvalidRequestError(`${kind} is a WebSocket: connect with Upgrade: websocket`);
      }
      const res = await upgrade(() => relayEvents(c.var.services, row, kind))(c, next);
      return res ?? c.body(null, 500);
    });
  }
}
