import { createRoute } from "@hono/zod-openapi";
import {
  ApiError,
  ARCHIVE_PATH,
  ClientGoneError,
  type ERROR_STATUS,
  Health,
  StreamToken,
  TimeoutError,
  UnitParseError,
} from "@offshoot/shared";
import { sql } from "drizzle-orm";
import type { Context, MiddlewareHandler, Next } from "hono";
import { bodyLimit } from "hono/body-limit";
import { HTTPException } from "hono/http-exception";
import type { UpgradeWebSocket } from "hono/ws";
import { isConnectionLost, pgErrorCode } from "./db/client.ts";
import { type AppEnv, newRouter } from "./routes/common.ts";
import { registerEventRoutes } from "./routes/events.ts";
import { registerHostRoutes } from "./routes/hosts.ts";
import { registerImageRoutes } from "./routes/images.ts";
import { registerInstanceRoutes } from "./routes/instances/index.ts";
import { referencePage } from "./routes/reference.ts";
import { registerScheduleRoutes, registerSnapshotRoutes } from "./routes/snapshots.ts";
import { registerUnsupportedRoutes, UNSUPPORTED_PREFIXES } from "./routes/unsupported.ts";
import { registerVolumeRoutes } from "./routes/volumes.ts";
import { newCall, type Services } from "./services/context.ts";
import { bearerToken, type Credentials } from "./services/credentials.ts";
import { parseWaitTimeout } from "./services/instances/wait.ts";

type ErrorStatus = (typeof ERROR_STATUS)[keyof typeof ERROR_STATUS];

/** The largest request body accepted; a larger one is refused (413) before it is read. The
 * largest legitimate body, a create carrying all the env, entrypoint and cmd an instance may
 * have (MAX_INSTANCE_METADATA_BYTES, 128 KiB), fits several times over. */
export const MAX_BODY_BYTES = 1024 * 1024;
/** The one route whose body is not JSON under MAX_BODY_BYTES: a volume's archive, streamed
 * under its own bound (VOLUME_ARCHIVE_MAX_BYTES). */
const ARCHIVE_UPLOAD = "/volumes/from-archive";
/** The WebSocket routes a stream token may open. */
const STREAM_PATH = /^\/instances\/[^/]+\/(exec|cp)$/;

/** How long past its deadline a request may run before the backstop answers for it: the verbs
 * stop waiting at the deadline themselves; this catches anything else (a database that does not
 * answer). */
const BACKSTOP_GRACE_MS = 1000;

/** How long /health waits for the database. */
const HEALTH_DB_TIMEOUT_MS = 2000;

function errorResponse(c: Context<AppEnv>, status: ErrorStatus, code: string, message: string) {
  // The official client retries 409s and 5xx by default; say which answers are final. A 504
  // is final too: the operation goes on, and repeating the request would only conflict with it.
  const final = status < 500 || status === 501 || status === 504;
  const headers: Record<string, string> = { "x-should-retry": final ? "false" : "true" };
  // A refused WebSocket upgrade reaches the client without its body on Node (the adapter writes
  // the status line and headers only): the error rides in headers too, as printable ASCII.
  if (c.req.header("upgrade")?.toLowerCase() === "websocket") {
    headers["x-error-code"] = code;
    headers["x-error-message"] = message.replace(/[^\x20-\x7e]/g, "?").slice(0, 1024);
  }
  return c.json({ code, message }, status, headers);
}

/** Whether any string in a JSON text (keys included) is one Postgres cannot store. */
function hasUnstorableString(text: string): boolean {
  if (!/\\u0000|\\ud[89a-f]/i.test(text)) return false; // the usual case: nothing escaped
  let bad = false;
  try {
    JSON.parse(text, (key, value: unknown) => {
      for (const str of [key, value]) {
        if (typeof str === "string" && (str.includes("\0") || !str.isWellFormed())) bad = true;
      }
      return value;
    });
  } catch {
    return false; // not JSON: the validator answers that
  }
  return bad;
}

export interface AppDeps {
  /** One per process on Node; on Workers one per request (I/O objects such as a database
   * connection cannot outlive the request that made them), hence the function form. */
  services: Services | ((c: Context<AppEnv>) => Services);
  credentials: Credentials | ((c: Context<AppEnv>) => Credentials);
  /** Mounts the agents' WebSocket endpoint; differs per runtime. `hostAuthed` admits a
   * request bearing a host token (and sets `agentHost`). */
  mountAgentEndpoint?: (app: ReturnType<typeof newRouter>, hostAuthed: HostAuthed) => void;
  /** The runtime's WebSocket upgrade, for exec and cp; without it they answer 400. */
  upgradeWebSocket?: UpgradeWebSocket<unknown>;
}

export type HostAuthed = MiddlewareHandler<AppEnv>;

export function createApp({
  services,
  credentials,
  mountAgentEndpoint,
  upgradeWebSocket,
}: AppDeps) {
  const app = newRouter();
  const servicesOf = (c: Context<AppEnv>) =>
    typeof services === "function" ? services(c) : services;
  const credentialsOf = (c: Context<AppEnv>) =>
    typeof credentials === "function" ? credentials(c) : credentials;

  app.onError((err, c) => {
    // Nobody reads this answer; nothing to log either.
    if (err instanceof ClientGoneError || c.req.raw.signal.aborted) return c.body(null, 499 as 400);
    if (err instanceof ApiError) return errorResponse(c, err.status, err.code, err.message);
    if (isConnectionLost(err)) {
      const s = c.var.services ?? servicesOf(c);
      s.dbHealth?.failed();
      s.log("warn", "database unavailable", {
        method: c.req.method,
        path: c.req.path,
        error: String(err),
      });
      return errorResponse(
        c,
        503,
        "database_unavailable",
        "the database is unavailable; retry shortly",
      );
    }
    if (err instanceof UnitParseError) return errorResponse(c, 400, "invalid_request", err.message);
    // Backstop: a value Postgres refuses to store is the request's fault, not ours.
    const { code } = pgErrorCode(err);
    if (code === "22P05" || code === "22021" || code === "22P02") {
      return errorResponse(c, 400, "invalid_request", "a value in the request cannot be stored");
    }
    if (err instanceof HTTPException && err.status < 500) {
      const status = err.status === 401 ? 401 : err.status === 404 ? 404 : 400;
      const code =
        status === 401 ? "unauthorized" : status === 404 ? "not_found" : "invalid_request";
      return errorResponse(c, status, code, err.message || "invalid request");
    }
    (c.var.services ?? servicesOf(c)).log("error", "request failed", {
      method: c.req.method,
      path: c.req.path,
      error: String(err),
      stack: err.stack,
    });
    return errorResponse(c, 500, "internal_error", "internal error; see the control plane's log");
  });
  app.notFound((c) =>
    errorResponse(c, 404, "not_found", `no route for ${c.req.method} ${c.req.path}`),
  );

  app.use("*", async (c, next) => {
    c.set("services", servicesOf(c));
    await next();
  });
  const limitBody = bodyLimit({
    maxSize: MAX_BODY_BYTES,
    onError: (c) =>
      errorResponse(
        c,
        413,
        "payload_too_large",
        `request bodies are limited to ${MAX_BODY_BYTES} bytes`,
      ),
  });
  // A volume's archive has its own, larger bound, counted as it streams (services/volumes.ts).
  app.use("*", (c, next) => (c.req.path === ARCHIVE_UPLOAD ? next() : limitBody(c, next)));

  app.openapi(
    createRoute({
      method: "get",
      path: "/health",
      summary: "Health check",
      description:
        "Whether this control plane can serve: 200 when its database answers, 503 when not.",
      responses: {
        200: { description: "Healthy", content: { "application/json": { schema: Health } } },
        503: {
          description: "The database does not answer",
          content: { "application/json": { schema: Health } },
        },
      },
    }),
    async (c) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const up = await Promise.race([
        c.var.services.db.execute(sql`select 1`).then(
          () => true,
          () => false,
        ),
        new Promise<false>((r) => {
          timer = setTimeout(() => r(false), HEALTH_DB_TIMEOUT_MS);
        }),
      ]);
      clearTimeout(timer);
      return up
        ? c.json({ status: "ok" as const, database: "up" as const }, 200)
        : c.json({ status: "unavailable" as const, database: "down" as const }, 503);
    },
  );
  app.doc31("/openapi.json", {
    openapi: "3.1.0",
    info: {
      title: "Offshoot API",
      version: "0.1.0",
      description: "Hypeman-compatible instance API, multi-tenant and multi-host.",
    },
  });
  app.openAPIRegistry.registerComponent("securitySchemes", "bearerAuth", {
    type: "http",
    scheme: "bearer",
  });
  app.get("/docs", (c) => c.html(referencePage()));
  // The web console (its files: console.ts on Node, the assets binding on Workers).
  app.get("/", (c) => c.redirect("/console/"));
  app.get("/console", (c) => c.redirect("/console/"));

  // What agents ask of the control plane: the WebSocket, and volumes' archives.
  const hostAuthed: HostAuthed = async (c, next) => {
    const token = bearerToken(c.req.header("authorization"));
    const host = token ? await credentialsOf(c).hostForToken(token) : undefined;
    if (!host) return c.json({ code: "unauthorized", message: "invalid host token" }, 401);
    c.set("agentHost", host);
    await next();
    return undefined;
  };
  mountAgentEndpoint?.(app, hostAuthed);
  app.use(ARCHIVE_PATH, hostAuthed);

  // Every route below needs an API key, and everything it reads is scoped to its tenant.
  const authed = async (c: Context<AppEnv>, next: () => Promise<void>) => {
    const token = bearerToken(c.req.header("authorization"));
    // A browser's exec or cp WebSocket carries a stream token (POST /auth/stream-token) instead.
    const streamToken =
      !token &&
      STREAM_PATH.test(c.req.path) &&
      c.req.header("upgrade")?.toLowerCase() === "websocket"
        ? c.req.query("token")
        : undefined;
    const tenantId = token
      ? await credentialsOf(c).tenantForKey(token)
      : streamToken
        ? await credentialsOf(c).tenantForStreamToken(streamToken)
        : undefined;
    if (!tenantId) {
      return errorResponse(
        c,
        401,
        "unauthorized",
        token ? "invalid API key" : "missing Authorization: Bearer <API key>",
      );
    }
    c.set("tenantId", tenantId);
    // Postgres cannot store NUL or a lone UTF-16 surrogate; refuse them here rather than
    // fail deep in a query.
    // (A volume's archive is binary, streamed, and never stored as text.)
    if (c.req.method !== "GET" && c.req.method !== "DELETE" && c.req.path !== ARCHIVE_UPLOAD) {
      if (hasUnstorableString(await c.req.text())) {
        return errorResponse(
          c,
          400,
          "invalid_request",
          "strings must not contain NUL characters or unpaired surrogates",
        );
      }
    }
    if (c.req.path.includes("\0") || c.req.url.includes("%00")) {
      return errorResponse(c, 404, "not_found", "not found");
    }
    await next();
    return undefined;
  };
  // A request answers by its deadline, whatever happens below it (see BACKSTOP_GRACE_MS). A log
  // stream is open-ended; a wait's deadline is its own timeout.
  const requestDeadline = async (c: Context<AppEnv>, next: Next) => {
    const s = c.var.services;
    const call = newCall(s, c.req.raw.signal);
    const isWait = c.req.method === "GET" && c.req.path.endsWith("/wait");
    if (isWait) call.deadline = Date.now() + parseWaitTimeout(c.req.query("timeout"));
    c.set("call", call);
    if (c.req.method === "GET" && c.req.path.endsWith("/logs")) return next();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const backstop = new Promise<"late">((r) => {
      timer = setTimeout(() => r("late"), call.deadline - Date.now() + BACKSTOP_GRACE_MS);
    });
    try {
      if ((await Promise.race([next(), backstop])) === "late") {
        s.log("warn", "request answered by its backstop", {
          method: c.req.method,
          path: c.req.path,
        });
        throw new TimeoutError("the request did not finish in time; what it recorded goes on");
      }
    } finally {
      clearTimeout(timer);
    }
  };

  const prefixes = [
    "/instances",
    "/images",
    "/volumes",
    "/snapshots",
    "/events",
    "/auth",
    "/hosts",
  ];
  for (const prefix of new Set([...prefixes, ...UNSUPPORTED_PREFIXES])) {
    for (const path of [prefix, `${prefix}/*`]) {
      app.use(path, authed);
      app.use(path, requestDeadline);
    }
  }

  app.openapi(
    createRoute({
      method: "post",
      path: "/auth/stream-token",
      summary: "Issue a stream token",
      description:
        "A single-use token, good for 60 s, that opens one exec or cp WebSocket as `?token=` in place of the API key: browsers cannot set the Authorization header on a WebSocket.",
      security: [{ bearerAuth: [] }],
      responses: {
        201: {
          description: "The token",
          content: { "application/json": { schema: StreamToken } },
        },
        401: { description: "Missing or invalid API key" },
      },
    }),
    async (c) => c.json(await credentialsOf(c).issueStreamToken(c.var.tenantId), 201),
  );

  registerInstanceRoutes(app, upgradeWebSocket);
  registerImageRoutes(app);
  registerVolumeRoutes(app);
  registerSnapshotRoutes(app);
  registerEventRoutes(app);
  registerHostRoutes(app);
  registerScheduleRoutes(app);
  registerUnsupportedRoutes(app);
  return app;
}
export type App = ReturnType<typeof createApp>;
