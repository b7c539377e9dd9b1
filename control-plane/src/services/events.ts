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
/** Event streams open at once per tenant, per control-plane process. */
export const EVENT_STREAMS_PER_TENANT = 16;

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

const open = new Map<string, number>();

/** Holds one of the tenant's stream places until `release` (429 when all are taken). */
export function openEventStream(tenantId: string): () => void {
  const n = open.get(tenantId) ?? 0;
  if (n >= EVENT_STREAMS_PER_TENANT) {
    throw new ApiError(
      "too_many_requests",
      `at most ${EVENT_STREAMS_PER_TENANT} event streams may be open at once; close one first`,
    );
  }
  open.set(tenantId, n + 1);
  let released = false;
  return () => {
    if (released) return;
    released = true;
    const left = (open.get(tenantId) ?? 1) - 1;
    if (left === 0) open.delete(tenantId);
    else open.set(tenantId, left);
  };
}
