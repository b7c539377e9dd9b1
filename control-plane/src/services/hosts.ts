import type { HostView } from "@offshoot/shared";
import { and, eq, inArray, isNull, lt, notInArray, or, sql } from "drizzle-orm";
import { isConnectionLost, transaction } from "../db/client.ts";
import { events, hosts, instances } from "../db/schema/index.ts";
import { hostGrace, type Services, topics } from "./context.ts";
import { capacity, online, overcommitOf, usage } from "./placement.ts";

/**
 * Runs sweepSilentHosts, except within HOST_GRACE_MS of the database last failing (see
 * DatabaseHealth): while it was away the hosts' heartbeats could not be recorded, so their age
 * says nothing, and sweeping at once would show every instance of the fleet Unknown after each
 * outage. Meanwhile it only checks that the database answers.
 */
export async function sweepUnlessDatabaseFailed(s: Services): Promise<number> {
  try {
    if (hostGrace(s) === null) {
      await s.db.execute(sql`select 1`);
      return 0;
    }
    return await sweepSilentHosts(s);
  } catch (e) {
    if (isConnectionLost(e)) s.dbHealth?.failed();
    throw e;
  }
}

/**
 * Hosts silent for longer than the grace period go offline and their instances Unknown,
 * with the reason in state_error. They converge on the host's next hello.
 */
export async function sweepSilentHosts(s: Services): Promise<number> {
  const cutoff = sql`now() - make_interval(secs => ${s.env.HOST_GRACE_MS / 1000})`;
  const silent = or(isNull(hosts.lastSeenAt), lt(hosts.lastSeenAt, cutoff));
  const changed = await transaction(s.db, async (tx) => {
    // Instances first, then hosts (the lock order everywhere). The silence is judged inside
    // each statement, so a host whose hello lands meanwhile is left alone.
    const stale = tx.select({ id: hosts.id }).from(hosts).where(silent);
    const rows = await tx
      .update(instances)
      .set({
        state: "Unknown",
        stateError: sql`'host ' || (select ${hosts.name} from ${hosts} where ${hosts.id} = ${instances.hostId}) || ' has not been heard from since ' || coalesce((select to_char(${hosts.lastSeenAt} at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') from ${hosts} where ${hosts.id} = ${instances.hostId}), 'it was registered')`,
      })
      .where(
        and(inArray(instances.hostId, stale), notInArray(instances.state, ["Unknown", "Created"])),
      )
      .returning({ id: instances.id, tenantId: instances.tenantId, hostId: instances.hostId });
    if (rows.length > 0) {
      await tx.insert(events).values(
        rows.map((r) => ({
          tenantId: r.tenantId,
          instanceId: r.id,
          hostId: r.hostId,
          type: "instance.state",
          data: { to: "Unknown", cause: "host.silent" },
        })),
      );
    }
    await tx
      .update(hosts)
      .set({ status: "offline" })
      .where(and(eq(hosts.status, "online"), silent));
    return rows.map((r) => r.id);
  });
  for (const id of changed) s.signals.notify(topics.instance(id));
  return changed.length;
}

/**
 * The hosts as a tenant sees them (GET /hosts): connected or not, last heartbeat, the capacity
 * every tenant's instances hold and what is left (overcommit included), and how many of this
 * tenant's instances each holds. Read in one transaction, so each host's figures agree.
 */
export async function hostsForTenant(s: Services, tenantId: string): Promise<HostView[]> {
  // As placement judges it: within the grace after a database outage, by status alone.
  const grace = hostGrace(s);
  return transaction(s.db, async (tx) => {
    const rows = await tx
      .select({ host: hosts, connected: sql<boolean>`${online(grace)}` })
      .from(hosts)
      .orderBy(hosts.name);
    const counts = await tx
      .select({ hostId: instances.hostId, n: sql<string>`count(*)` })
      .from(instances)
      .where(eq(instances.tenantId, tenantId))
      .groupBy(instances.hostId);
    const mine = new Map(counts.map((c) => [c.hostId, Number(c.n)]));
    const over = overcommitOf(s.env);
    const views: HostView[] = [];
    for (const { host, connected } of rows) {
      const used = await usage(tx, host.id);
      const cap = capacity(host, over);
      views.push({
        id: host.id,
        name: host.name,
        connected: Boolean(connected),
        last_heartbeat_at: host.lastSeenAt?.toISOString() ?? null,
        driver: host.driver,
        vcpus: {
          total: cap.vcpus,
          allocated: used.vcpus,
          free: Math.max(0, cap.vcpus - used.vcpus),
        },
        memory: {
          total_bytes: cap.memoryBytes,
          allocated_bytes: used.memoryBytes,
          free_bytes: Math.max(0, cap.memoryBytes - used.memoryBytes),
          available_bytes: host.memoryAvailableBytes,
        },
        instances: mine.get(host.id) ?? 0,
      });
    }
    return views;
  });
}
