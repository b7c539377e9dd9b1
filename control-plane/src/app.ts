import { createRoute } from "@hono/zod-openapi";
import { ApiError, type ERROR_STATUS, Health, UnitParseError } from "@offshoot/shared";
import type { Context } from "hono";
import { HTTPException } from "hono/http-exception";
import { pgErrorCode } from "./db/client.ts";
import { type AppEnv, newRouter } from "./routes/common.ts";
import { registerImageRoutes } from "./routes/images.ts";
import { registerInstanceRoutes } from "./routes/instances/index.ts";
import { referencePage } from "./routes/reference.ts";
import type { Services } from "./services/context.ts";
import type { Credentials } from "./services/credentials.ts";

type ErrorStatus = (typeof ERROR_STATUS)[keyof typeof ERROR_STATUS];

function errorResponse(c: Context<AppEnv>, status: ErrorStatus, code: string, message: string) {
  // The official client retries 409s and 5xx by default; say which answers are final. A 504
  // is final too: the operation goes on, and repeating the request would only conflict with it.
  const final = status < 500 || status === 501 || status === 504;
  return c.json({ code, message }, status, { "x-should-retry": final ? "false" : "true" });
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
  /** Mounts the agents' WebSocket endpoint; differs per runtime. */
  mountAgentEndpoint?: (app: ReturnType<typeof newRouter>) => void;
}

export function createApp({ services, credentials, mountAgentEndpoint }: AppDeps) {
  const app = newRouter();
  const servicesOf = (c: Context<AppEnv>) =>
    typeof services === "function" ? services(c) : services;
  const credentialsOf = (c: Context<AppEnv>) =>
    typeof credentials === "function" ? credentials(c) : credentials;

  app.onError((err, c) => {
    if (err instanceof ApiError) return errorResponse(c, err.status, err.code, err.message);
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

  app.openapi(
    createRoute({
      method: "get",
      path: "/health",
      summary: "Health check",
      responses: {
        200: { description: "Healthy", content: { "application/json": { schema: Health } } },
      },
    }),
    (c) => c.json({ status: "ok" as const }, 200),
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

  mountAgentEndpoint?.(app);

  // Every route below needs an API key, and everything it reads is scoped to its tenant.
  const authed = async (c: Context<AppEnv>, next: () => Promise<void>) => {
    const m = /^Bearer\s+(\S+)\s*$/i.exec(c.req.header("authorization") ?? "");
    const tenantId = m?.[1] ? await credentialsOf(c).tenantForKey(m[1]) : undefined;
    if (!tenantId) {
      return errorResponse(
        c,
        401,
        "unauthorized",
        m ? "invalid API key" : "missing Authorization: Bearer <API key>",
      );
    }
    c.set("tenantId", tenantId);
    // Postgres cannot store NUL or a lone UTF-16 surrogate; refuse them here rather than
    // fail deep in a query.
    if (c.req.method !== "GET" && c.req.method !== "DELETE") {
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
  app.use("/instances", authed);
  app.use("/instances/*", authed);
  app.use("/images", authed);
  app.use("/images/*", authed);

  registerInstanceRoutes(app);
  registerImageRoutes(app);
  return app;
}
export type App = ReturnType<typeof createApp>;
