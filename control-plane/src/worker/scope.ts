// Services for one request (or one Durable Object event) on Workers: a postgres.js client on the
// Hyperdrive binding, since an I/O object cannot outlive the request that made it. The client is
// not ended: postgres.js's end() inside workerd leaves an unhandled rejection
// (porsager/postgres#1202); its sockets close with the request instead.
import { connectPostgres } from "../db/client.ts";
import { loadEnv } from "../env.ts";
import type { HostGateway } from "../gateway/host-gateway.ts";
import type { Log } from "../log.ts";
import type { Services } from "../services/context.ts";
import { Operations } from "../services/operations.ts";
import { Signals } from "../services/signals.ts";
import type { Bindings } from "./types.ts";

export const workerLog =
  (component: string): Log =>
  (level, msg, fields) => {
    if (level === "debug") return;
    const line = JSON.stringify({ t: new Date().toISOString(), level, component, msg, ...fields });
    if (level === "error" || level === "warn") console.error(line);
    else console.log(line);
  };

export function servicesFor(
  bindings: Bindings,
  gateway: (signals: Signals, log: Log) => HostGateway,
  component = "worker",
): Services {
  const env = loadEnv({
    HEARTBEAT_MS: bindings.HEARTBEAT_MS,
    HOST_GRACE_MS: bindings.HOST_GRACE_MS,
    COMMAND_TIMEOUT_MS: bindings.COMMAND_TIMEOUT_MS,
    VCPU_OVERCOMMIT: bindings.VCPU_OVERCOMMIT,
    MEMORY_OVERCOMMIT: bindings.MEMORY_OVERCOMMIT,
  });
  const log = workerLog(component);
  const { db } = connectPostgres(bindings.HYPERDRIVE.connectionString, { max: 3 });
  const signals = new Signals();
  const gw = gateway(signals, log);
  return { db, env, gateway: gw, signals, ops: new Operations(db, gw, signals, log), log };
}
