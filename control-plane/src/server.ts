import type { Server } from "node:http";
import type { AddressInfo } from "node:net";
import { serve, upgradeWebSocket } from "@hono/node-server";
import { eq } from "drizzle-orm";
import type { UpgradeWebSocket } from "hono/ws";
import { WebSocketServer } from "ws";
import { createApp, type HostAuthed } from "./app.ts";
import { mountConsole } from "./console.ts";
import type { Database } from "./db/client.ts";
import { openDatabase } from "./db/open.ts";
import { apiKeys } from "./db/schema/index.ts";
import type { Env } from "./env.ts";
import { HOP_PATH, NodeGateway } from "./gateway/node.ts";
import type { Log } from "./log.ts";
import type { Router } from "./routes/common.ts";
import { PgBus } from "./services/bus.ts";
import { DatabaseHealth, type Services } from "./services/context.ts";
import {
  BOOTSTRAP_KEY,
  bearerToken,
  Credentials,
  createApiKey,
  DEFAULT_TENANT,
  ensureTenant,
  revokeKeysNamed,
  tenantHasKeys,
} from "./services/credentials.ts";
import { sweepUnlessDatabaseFailed } from "./services/hosts.ts";
import { resumeForks } from "./services/instances/fork.ts";
import { Operations } from "./services/operations.ts";
import { startScheduleRunner } from "./services/schedules.ts";
import { Signals } from "./services/signals.ts";

export { AGENT_PATH } from "@offshoot/shared";

import { AGENT_LIMITS, AGENT_PATH } from "@offshoot/shared";
import { makeIdsAhead } from "./services/instances/ids.ts";

/** How often a waiter re-checks the database on its own (see Signals). */
const WAIT_POLL_MS = 5_000;

export interface RunningServer {
  url: string;
  port: number;
  services: Services;
  gateway: NodeGateway;
  close(): Promise<void>;
}

/** Wires the Node deployment: database, services, HTTP + WebSocket server, background loops. */
export async function startServer(
  env: Env,
  log: Log,
  opts: { database?: Database } = {},
): Promise<RunningServer> {
  makeIdsAhead();
  const database =
    opts.database ??
    (await openDatabase({
      url: env.DATABASE_URL,
      pgliteDir: `${env.DATA_DIR}/pglite`,
      onUnavailable: (error, retryMs) =>
        log("warn", "database unavailable at start; retrying", { error: String(error), retryMs }),
    }));
  const { db } = database;
  // Replicas sharing a Postgres server coordinate over LISTEN/NOTIFY (services/bus.ts).
  const bus = database.pubsub ? await PgBus.start(database.pubsub, log) : undefined;
  const gateway = new NodeGateway(bus);
  // Wake-ups reach every waiter in this process, and other replicas' over the bus (which wakes
  // everyone after it lost its connection), so the poll is only a backstop.
  const signals = new Signals(bus, WAIT_POLL_MS);
  const ops = new Operations(db, gateway, signals, log);
  const services: Services = {
    db,
    env,
    gateway,
    signals,
    ops,
    log,
    dbHealth: new DatabaseHealth(),
  };
  gateway.bind(services);
  const credentials = new Credentials(db, env.API_KEY_CACHE_MS);

  await ensureDefaultKey(services, env, log);

  const mountAgentEndpoint = (app: Router, hostAuthed: HostAuthed) => {
    app.get(
      AGENT_PATH,
      hostAuthed,
      upgradeWebSocket((c) => {
        const host = c.get("agentHost");
        let session: ReturnType<NodeGateway["open"]> | undefined;
        return {
          onOpen: (_evt, ws) => {
            session = gateway.open(host, {
              send: (text) => ws.send(text),
              sendBinary: (frame) => ws.send(frame),
              close: (code, reason) => ws.close(code, reason),
            });
          },
          onMessage: (evt) => {
            if (typeof evt.data === "string") session?.receive(evt.data);
            else if (evt.data instanceof ArrayBuffer)
              session?.receiveBinary(new Uint8Array(evt.data));
          },
          onClose: () => {
            if (session) gateway.closed(session);
          },
        };
      }),
    );
    // Other replicas' streams to the agents held here: a one-time token from the bus.
    app.get(HOP_PATH, async (c, next) => {
      const hostId = gateway.takeHopToken(bearerToken(c.req.header("authorization")) ?? "");
      if (!hostId) return c.json({ code: "unauthorized", message: "invalid hop token" }, 401);
      let hop: ReturnType<NodeGateway["serveHop"]> | undefined;
      const res = await upgradeWebSocket(() => ({
        onOpen: (_evt, ws) => {
          hop = gateway.serveHop(hostId, {
            send: (d) => ws.send(d),
            close: (code, reason) => ws.close(code, reason),
          });
        },
        onMessage: (evt) => hop?.receive(evt.data as string | ArrayBuffer),
        onClose: () => hop?.closed(),
      }))(c, next);
      return res ?? c.body(null, 500);
    });
  };

  const app = createApp({
    services,
    credentials,
    mountAgentEndpoint,
    upgradeWebSocket: upgradeWebSocket as UpgradeWebSocket<unknown>,
  });
  mountConsole(app);
  const wss = new WebSocketServer({ noServer: true, maxPayload: AGENT_LIMITS.frameBytes });
  const server = await new Promise<Server>((resolve) => {
    const srv = serve(
      { fetch: app.fetch, port: env.PORT, hostname: env.HOST, websocket: { server: wss } },
      () => resolve(srv as Server),
    );
  });
  const port = (server.address() as AddressInfo).port;

  // Background loops: hosts gone silent → Unknown; fork flows left by a previous process;
  // snapshot schedules due.
  const sweeper = setInterval(
    () =>
      void sweepUnlessDatabaseFailed(services).catch((e: unknown) =>
        log("error", "sweep failed", { error: String(e) }),
      ),
    Math.max(100, Math.min(env.HOST_GRACE_MS / 2, 5000)),
  );
  const resumer = setInterval(
    () =>
      void resumeForks(services).catch((e: unknown) =>
        log("error", "resume failed", { error: String(e) }),
      ),
    env.FORK_RESUME_MS,
  );
  await resumeForks(services);
  const stopSchedules = startScheduleRunner(services, env.SNAPSHOT_SCHEDULE_TICK_MS);

  const url = `http://127.0.0.1:${port}`;
  gateway.setHopUrl(env.REPLICA_URL ?? url);
  log("info", "listening", { url, port, database: database.kind });
  return {
    url,
    port,
    services,
    gateway,
    close: async () => {
      clearInterval(sweeper);
      clearInterval(resumer);
      stopSchedules();
      await gateway.close();
      await bus?.close();
      for (const client of wss.clients) client.terminate();
      await new Promise<void>((r) => {
        server.close(() => r());
        server.closeAllConnections?.();
      });
      if (!opts.database) await database.close();
    },
  };
}

/** The seed's examples use HYPEMAN_API_KEY; make sure it works, or mint a first key. */
async function ensureDefaultKey(s: Services, env: Env, log: Log): Promise<void> {
  const tenantId = await ensureTenant(s.db, DEFAULT_TENANT);
  if (env.HYPEMAN_API_KEY) {
    // The bootstrap key is the one given now: one given to an earlier start stops working.
    const { id } = await createApiKey(s.db, tenantId, {
      secret: env.HYPEMAN_API_KEY,
      name: BOOTSTRAP_KEY,
    });
    // Given again after another replaced it, it works again: the environment says so.
    await s.db.update(apiKeys).set({ revokedAt: null }).where(eq(apiKeys.id, id));
    const revoked = await revokeKeysNamed(s.db, tenantId, BOOTSTRAP_KEY, id);
    if (revoked > 0) log("info", "revoked the previous HYPEMAN_API_KEY", { keys: revoked });
    return;
  }
  if (!(await tenantHasKeys(s.db, tenantId))) {
    const { key } = await createApiKey(s.db, tenantId, { name: "first key" });
    log("info", "created an API key for the default tenant; it is shown only this once", {
      api_key: key,
    });
  }
}
