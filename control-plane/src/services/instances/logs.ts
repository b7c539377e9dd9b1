import { HostUnavailableError, type LogSource } from "@offshoot/shared";
import type { LogSink } from "../../gateway/host-gateway.ts";
import type { Services } from "../context.ts";
import { resolveInstance } from "./resolve.ts";

export interface LogsQuery {
  tail: number;
  follow: boolean;
  source: LogSource;
}

/** Holds what arrives before the transport is ready to write it. */
class BufferedSink implements LogSink {
  private target: LogSink | undefined;
  private pending: Array<(t: LogSink) => void> = [];
  lines(lines: string[]) {
    this.deliver((t) => t.lines(lines));
  }
  end(error?: Parameters<LogSink["end"]>[0]) {
    this.deliver((t) => t.end(error));
  }
  attach(target: LogSink) {
    this.target = target;
    for (const f of this.pending) f(target);
    this.pending = [];
  }
  private deliver(f: (t: LogSink) => void) {
    if (this.target) f(this.target);
    else this.pending.push(f);
  }
}

/**
 * GET /instances/{id}/logs: opens the stream before the response starts, so that an unknown
 * instance is a 404 and an unreachable host a 503 rather than an empty 200. The transport
 * then attaches its writer, and cancels when the client goes away.
 */
export async function openLogs(
  s: Services,
  tenantId: string,
  ref: string,
  q: LogsQuery,
): Promise<{ attach(sink: LogSink): void; cancel(): void }> {
  const instance = await resolveInstance(s.db, tenantId, ref);
  const buffer = new BufferedSink();
  const cancel = await s.gateway.openLogs(
    instance.hostId,
    { instance_id: instance.id, source: q.source, tail: q.tail, follow: q.follow },
    buffer,
  );
  if (!cancel) {
    throw new HostUnavailableError(`the host of instance ${instance.name} is not connected`);
  }
  return { attach: (sink) => buffer.attach(sink), cancel };
}
