// Inside an instance: exec, stat and stats go to its host's agent as streams (shared/src/tunnel.ts)
// through the gateway. The checks come first, before any stream (or WebSocket) is opened: the
// instance is the caller's, it is Running, and it has a guest agent.

import type { InstanceStats } from "@offshoot/shared";
import {
  ApiError,
  ConflictError,
  type ErrorCode,
  HostUnavailableError,
  InvalidStateError,
  PathInfo,
  type StreamKind,
  TimeoutError,
  VmmStats,
} from "@offshoot/shared";
import type { InstanceRow } from "../../db/schema/index.ts";
import type { StreamHandle, StreamSink } from "../../gateway/relay.ts";
import type { Services } from "../context.ts";
import { resolveInstance } from "./resolve.ts";

/** How long a stat or stats may take on the host. */
const QUERY_TIMEOUT_MS = 30_000;

/** The instance a guest operation is for, checked. */
export async function guestTarget(
  s: Services,
  tenantId: string,
  ref: string,
  opts: { needsAgent: boolean },
): Promise<InstanceRow> {
  const row = await resolveInstance(s.db, tenantId, ref);
  if (row.state !== "Running") {
    throw new InvalidStateError(`instance must be running (current state: ${row.state})`);
  }
  if (opts.needsAgent && row.skipGuestAgent) {
    throw new ConflictError(
      `instance ${row.name} was created with skip_guest_agent: exec, cp and stat need the guest agent`,
    );
  }
  return row;
}

/** Opens a stream to the instance's host, or says why it cannot. */
export async function openGuestStream(
  s: Services,
  row: InstanceRow,
  kind: StreamKind,
  sink: StreamSink,
  query?: { path: string; follow_links: boolean },
): Promise<StreamHandle> {
  const handle = await s.gateway.openStream(
    row.hostId,
    { instance_id: row.id, kind, ...(query && { query }) },
    sink,
  );
  if (!handle) throw new HostUnavailableError(`the host of instance ${row.name} is not connected`);
  return handle;
}

/** A one-answer stream (stat, stats): its JSON text message. */
async function ask(
  s: Services,
  row: InstanceRow,
  kind: StreamKind,
  query?: { path: string; follow_links: boolean },
): Promise<unknown> {
  let answer: string | undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let handle: StreamHandle | undefined;
  const result = new Promise<unknown>((resolve, reject) => {
    timer = setTimeout(() => {
      handle?.close();
      reject(new TimeoutError(`the host did not answer the ${kind} in time`));
    }, QUERY_TIMEOUT_MS);
    const sink: StreamSink = {
      message: (text, payload) => {
        if (text && answer === undefined) answer = new TextDecoder().decode(payload);
      },
      end: (_reason, error) => {
        if (error) return reject(new ApiError(error.code as ErrorCode, error.message));
        if (answer === undefined) return reject(new Error(`the host's ${kind} stream was empty`));
        try {
          resolve(JSON.parse(answer));
        } catch {
          reject(new Error(`the host's ${kind} answer is not JSON`));
        }
      },
    };
    openGuestStream(s, row, kind, sink, query).then((h) => {
      handle = h;
    }, reject);
  });
  try {
    return await result;
  } finally {
    clearTimeout(timer);
  }
}

/** GET /instances/{id}/stat */
export async function statPath(
  s: Services,
  tenantId: string,
  ref: string,
  path: string,
  followLinks: boolean,
): Promise<PathInfo> {
  const row = await guestTarget(s, tenantId, ref, { needsAgent: true });
  return PathInfo.parse(await ask(s, row, "stat", { path, follow_links: followLinks }));
}

/** GET /instances/{id}/stats */
export async function instanceStats(
  s: Services,
  tenantId: string,
  ref: string,
): Promise<InstanceStats> {
  const row = await guestTarget(s, tenantId, ref, { needsAgent: false });
  const vmm = VmmStats.parse(await ask(s, row, "stats"));
  const allocated = row.memoryBytes + row.hotplugBytes;
  return {
    instance_id: row.id,
    instance_name: row.name,
    ...vmm,
    allocated_vcpus: row.vcpus,
    allocated_memory_bytes: allocated,
    ...(allocated > 0 && { memory_utilization_ratio: vmm.memory_rss_bytes / allocated }),
  };
}
