import type { Command, CommandError, LogQuery } from "@offshoot/shared";
import type { StreamHandle, StreamRequest, StreamSink } from "./relay.ts";

/**
 * Where a log stream's lines go; `end` is called once, with an error if it broke off. `lines`
 * resolves once the reader has taken them: only then may the host send more (see LogsAck), so
 * what a stream holds in memory is bounded by AGENT_LIMITS.logWindow chunks.
 */
export interface LogSink {
  lines(lines: string[]): void | Promise<void>;
  end(error?: CommandError): void;
}

/**
 * How services reach hosts. Services record a command in Postgres first, then ask the gateway
 * to deliver it; delivery is at-least-once (re-sent after every reconnect) and the agent's
 * journal makes execution exactly-once. The Node implementation keeps agent sockets in this
 * process; a Workers implementation forwards to the host's Durable Object.
 */
export interface HostGateway {
  /** Delivers to the host's agent: true if it was sent from this process, false if it was
   * handed on (to the replica holding the agent) or must wait for the agent's next hello. */
  send(hostId: string, command: Command): boolean;
  /** Whether a command sent now reaches the host as it is (with any secrets it carries), not
   * re-read from the table by the replica holding the agent. */
  reachesDirectly(hostId: string): boolean;
  /**
   * Streams a log from the host. Live data, not a durable command: undefined when the host's
   * agent is not connected (here or, with replicas, anywhere). Returns a function that cancels
   * the stream.
   */
  openLogs(hostId: string, query: LogQuery, sink: LogSink): Promise<(() => void) | undefined>;
  /**
   * Opens a stream to the host's agent (exec, stat, stats; shared/src/tunnel.ts). Live, like
   * logs: undefined when the host's agent cannot be reached from here.
   */
  openStream(
    hostId: string,
    req: StreamRequest,
    sink: StreamSink,
  ): Promise<StreamHandle | undefined>;
}
