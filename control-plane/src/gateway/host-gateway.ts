import type { Command } from "@offshoot/shared";

/**
 * How services reach hosts. Services record a command in Postgres first, then ask the gateway
 * to deliver it; delivery is at-least-once (re-sent after every reconnect) and the agent's
 * journal makes execution exactly-once. The Node implementation keeps agent sockets in this
 * process; a Workers implementation forwards to the host's Durable Object.
 */
export interface HostGateway {
  /** Deliver now if the host's agent is connected to this process; false if not. */
  send(hostId: string, command: Command): boolean;
}
