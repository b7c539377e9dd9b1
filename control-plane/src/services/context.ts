import type { Db } from "../db/client.ts";
import type { Env } from "../env.ts";
import type { HostGateway } from "../gateway/host-gateway.ts";
import type { Log } from "../log.ts";
import type { Operations } from "./operations.ts";
import type { Signals } from "./signals.ts";

/** What every service verb needs; built once per process. */
export interface Services {
  db: Db;
  env: Env;
  gateway: HostGateway;
  signals: Signals;
  ops: Operations;
  log: Log;
}

export const topics = {
  operation: (id: string) => `op:${id}`,
  instance: (id: string) => `instance:${id}`,
};
