import type { Command, CommandError, LogsRequest } from "@offshoot/shared";

export type LogQuery = Pick<LogsRequest, "instance_id" | "source" | "tail" | "follow">;

/** Where a log stream's lines go; `end` is called once, with an error if it broke off. */
export interface LogSink {
  lines(lines: string[]): void;
  end(error?: CommandError): void;
}

/**
 * How services reach hosts. Services record a command in Postgres first, then ask the gateway
 * to deliver it; delivery is at-least-once (re-sent after every reconnect) and the agent's
 * journal makes execution exactly-once. The Node implementation keeps agent sockets in this
 * process; a Workers implementation forwards to the host's Durable Object.
 */
export interface HostGateway {
  /** Deliver now if the host's agent is connected to this process; false if not. */
  send(hostId: string, command: Command): boolean;
  /**
   * Streams a log from the host. Live data, not a durable command: undefined when the host's
   * agent is not connected here. Returns a function that cancels the stream.
   */
  openLogs(hostId: string, query: LogQuery, sink: LogSink): (() => void) | undefined;
}
