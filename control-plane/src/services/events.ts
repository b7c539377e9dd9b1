// A tenant's events, as a stream (GET /events): what happened to its instances — created, each
// change of state, deleted — in the order the database recorded it, from the `events` table.
// A stream starts at the newest event (or after the one a client names, to resume), then
// sends each new one as it is recorded: a reader is woken by the instance changes this replica
// records, and otherwise looks again every second, so events recorded by another replica or a
// host's silence arrive within a second.
import { ApiError, type TenantEvent } from "@offshoot/shared";
import { and, asc, eq, gt, inArray, max, type SQL, sql } from "drizzle-orm";
import { events, type InstanceRow, instances } from "../db/schema/index.ts";
import type { Services } from "./context.ts";
import { present } from "./instances/present.ts";

/** Events one read sends at most (a stream behind reads again at once). */
export const EVENT_BATCH = 100;
/** Event streams open at once per tenant, per control-plane process (Workers: per isolate). */
export const EVENT_STREAMS_PER_TENANT = 16;
/** A stream writes at least this often (a comment line when nothing happened), which keeps
 * proxies from closing a quiet stream and shows the stream is alive. */
export const EVENT_KEEPALIVE_MS = 15_000;
/**
 * A stream's place is held while the stream renews it, each time it looks for events (every
 * second, or sooner when woken). A stream can end without being told its client left (on
 * Workers, a request whose client went away can be torn down with its code suspended, never
 * reaching its own cleanup): its place is free again this long after it last looked.
 */
export const EVENT_STREAM_LEASE_MS = 10_000;

/** The insert of a new instance's `instance.created` event (with its row, in its transaction). */
export function insertCreatedEvent(row: InstanceRow): SQL {
  const data = {
    name: row.name,
    image: row.image,
    ...(row.forkedFrom !== null && { forked_from: row.forkedFrom }),
  };
  return sql`insert into events (tenant_id, instance_id, host_id, type, data)
    values (${row.tenantId}, ${row.id}, ${row.hostId}, 'instance.created', ${JSON.stringify(data)}::jsonb)`;
}

/** The tenant's events after `after`, oldest first, with their instances as they are now. */
export async function eventsAfter(
  s: Services,
  tenantId: string,
  after: number,
): Promise<TenantEvent[]> {
  const rows = await s.db
    .select()
    .from(events)
    .where(and(eq(events.tenantId, tenantId), gt(events.id, after)))
    .orderBy(asc(events.id))
    .limit(EVENT_BATCH);
  const ids = [...new Set(rows.flatMap((r) => (r.instanceId ? [r.instanceId] : [])))];
  const now =
    ids.length === 0
      ? []
      : await s.db
          .select()
          .from(instances)
          .where(and(eq(instances.tenantId, tenantId), inArray(instances.id, ids)));
  const byId = new Map(now.map((r) => [r.id, present(r)]));
  return rows.map((r) => ({
    id: r.id,
    type: r.type,
    instance_id: r.instanceId,
    created_at: r.createdAt.toISOString(),
    data: r.data,
    ...(r.instanceId && { instance: byId.get(r.instanceId) ?? null }),
  }));
}

/** The id of the tenant's newest event (0 if none): where a new stream starts. */
export async function newestEventId(s: Services, tenantId: string): Promise<number> {
  const [row] = await s.db
    .select({ id: max(events.id) })
    .from(events)
    .where(eq(events.tenantId, tenantId));
  return row?.id ?? 0;
}

/** Per tenant, when each open stream's place expires unless renewed. */
const open = new Map<string, Map<object, number>>();

export interface EventStreamPlace {
  /** The stream is alive: its place is held for another lease. */
  renew(): void;
  release(): void;
}

/** Takes one of the tenant's stream places (429 when all are held). */
export function openEventStream(tenantId: string, now = Date.now): EventStreamPlace {
  const places = open.get(tenantId) ?? new Map<object, number>();
  for (const [place, expires] of places) if (expires <= now()) places.delete(place);
  if (places.size >= EVENT_STREAMS_PER_TENANT) {
    throw new ApiError(
      "too_many_requests",
      `at most ${EVENT_STREAMS_PER_TENANT} event streams may be open at once; close one first`,
    );
  }
  const place = {};
  places.set(place, now() + EVENT_STREAM_LEASE_MS);
  open.set(tenantId, places);
  return {
    renew: () => {
      if (places.has(place)) places.set(place, now() + EVENT_STREAM_LEASE_MS);
    },
    release: () => {
      places.delete(place);
      if (places.size === 0 && open.get(tenantId) === places) open.delete(tenantId);
    },
  };
}
