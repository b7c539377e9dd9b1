// The control plane on Cloudflare Workers: the same Hono app, routes and services as on Node
// (server.ts). What differs: services are made per request (scope.ts), agents connect to their
// host's HostSession Durable Object (host-session.ts), commands reach it through
// WorkersGateway, and the background loops (silent hosts, fork flows left pending) run on the
// cron trigger. Migrations are applied from Node beforehand (`npm run db:migrate`).
import { AGENT_PATH } from "@offshoot/shared";
import type { Context } from "hono";
import { upgradeWebSocket } from "hono/cloudflare-workers";
import type { UpgradeWebSocket } from "hono/ws";
import { createApp } from "../app.ts";
import type { AppEnv } from "../routes/common.ts";
import { Credentials } from "../services/credentials.ts";
import { sweepSilentHosts } from "../services/hosts.ts";
import { drivingFlows, resumeForks } from "../services/instances/fork.ts";
import { runDueSchedules } from "../services/schedules.ts";
import { SESSION_URL, sessionStub, WorkersGateway } from "./gateway.ts";
import { servicesFor } from "./scope.ts";
import { HOST_HEADER, type SessionHost } from "./session-protocol.ts";
import type { Bindings, ExecutionContext } from "./types.ts";

export { HostSession } from "./host-session.ts";

type WorkerContext = Context<AppEnv & { Bindings: Bindings }>;

const scoped = (bindings: Bindings, ctx: Pick<ExecutionContext, "waitUntil">) =>
  servicesFor(bindings, (signals, log) => new WorkersGateway(bindings, ctx, signals, log));

const app = createApp({
  services: (c) => {
    const wc = c as unknown as WorkerContext;
    return scoped(wc.env, wc.executionCtx);
  },
  credentials: (c) => new Credentials(c.var.services.db, 0),
  upgradeWebSocket: upgradeWebSocket as UpgradeWebSocket<unknown>,
  mountAgentEndpoint: (router, hostAuthed) => {
    router.get(AGENT_PATH, hostAuthed, async (c) => {
      const host = c.get("agentHost");
      if (c.req.header("upgrade")?.toLowerCase() !== "websocket") {
        return c.json({ code: "invalid_request", message: "expected a WebSocket upgrade" }, 400);
      }
      const forward = new Request(`${SESSION_URL}/connect`, c.req.raw);
      forward.headers.set(HOST_HEADER, JSON.stringify(host satisfies SessionHost));
      const bindings = (c as unknown as WorkerContext).env;
      return sessionStub(bindings, host.id).fetch(forward as never) as unknown as Response;
    });
  },
});

export default {
  fetch: (req: Request, env: Bindings, ctx: ExecutionContext) => {
    // Tests only (SESSION_TEST_EVICT=1): drop a host's HostSession from memory.
    const evict = /^\/__test\/evict\/([^/]+)$/.exec(new URL(req.url).pathname);
    if (evict?.[1] && env.SESSION_TEST_EVICT === "1") {
      return sessionStub(env, evict[1])
        .fetch(`${SESSION_URL}/__evict`, { method: "POST" })
        .then(
          (r) => new Response(null, { status: r.status }),
          () => new Response(null, { status: 202 }),
        );
    }
    return app.fetch(req, env, ctx as never);
  },
  /** Cron: hosts gone silent → Unknown; fork flows whose request died are driven on; snapshot
   * schedules due are run. */
  async scheduled(_event: unknown, env: Bindings, ctx: ExecutionContext) {
    const s = scoped(env, ctx);
    await sweepSilentHosts(s);
    await resumeForks(s);
    ctx.waitUntil(
      runDueSchedules(s).catch((e: unknown) =>
        s.log("error", "schedule runner failed", { error: String(e) }),
      ),
    );
    ctx.waitUntil(Promise.allSettled(drivingFlows(s)));
  },
};
