import { HostUnavailableError, type LogQuery } from "@offshoot/shared";
import type { LogSink } from "../../gateway/host-gateway.ts";
import type { Services } from "../context.ts";
import { resolveInstance } from "./resolve.ts";

/** A log query of an instance the caller names (by id, name or prefix). */
export type LogsQuery = Omit<LogQuery, "instance_id">;

/** Holds what arrives before the transport is ready to write it (at most the stream's window:
 * nothing held is acknowledged until the transport has taken it). */
class BufferedSink implements LogSink {
  private target: LogSink | undefined;
  private attached: Promise<LogSink>;
  private onAttach: (t: LogSink) => void = () => {};
  constructor() {
    this.attached = new Promise((resolve) => {
      this.onAttach = resolve;
    });
  }
  lines(lines: string[]): void | Promise<void> {
    if (this.target) return this.target.lines(lines);
    return this.attached.then((t) => t.lines(lines));
  }
  end(error?: Parameters<LogSink["end"]>[0]) {
    if (this.target) this.target.end(error);
    else void this.attached.then((t) => t.end(error));
  }
  attach(target: LogSink) {
    this.target = target;
    this.onAttach(target);
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
