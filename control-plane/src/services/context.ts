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
  /** Absent where services live for one request (Workers): nothing to remember there. */
  dbHealth?: DatabaseHealth;
}

/**
 * When this process last saw the database fail (unreachable, or the session dropped). While
 * the database is away, hosts' heartbeats cannot be recorded: for HOST_GRACE_MS after such a
 * failure, a host's age since its last recorded heartbeat says nothing about it (see hostGrace).
 */
export class DatabaseHealth {
  private lastFailure = Number.NEGATIVE_INFINITY;
  constructor(private now: () => number = Date.now) {}
  failed(): void {
    this.lastFailure = this.now();
  }
  failedWithin(ms: number): boolean {
    return this.now() - this.lastFailure < ms;
  }
}

/** How recently a host must have been heard from to count as connected: HOST_GRACE_MS, or null
 * (its status alone) while the database's own absence may be why it was not heard. */
export const hostGrace = (s: Pick<Services, "env" | "dbHealth">): number | null =>
  s.dbHealth?.failedWithin(s.env.HOST_GRACE_MS) ? null : s.env.HOST_GRACE_MS;

export const topics = {
  operation: (id: string) => `op:${id}`,
  instance: (id: string) => `instance:${id}`,
  /** A tenant's event stream (GET /events). */
  events: (tenantId: string) => `events:${tenantId}`,
};

/**
 * What a request gives the verb it calls: when it must have answered (the request's share of
 * COMMAND_TIMEOUT_MS, counted from its arrival), and a signal that aborts when its client goes
 * away. A verb stops waiting at either; the operation it recorded goes on.
 */
export interface Call {
  deadline: number;
  signal?: AbortSignal;
}

/** A call that must answer within COMMAND_TIMEOUT_MS from now. */
export const newCall = (s: Pick<Services, "env">, signal?: AbortSignal): Call => ({
  deadline: Date.now() + s.env.COMMAND_TIMEOUT_MS,
  ...(signal && { signal }),
});

export const timeLeft = (call: Call) => Math.max(0, call.deadline - Date.now());
