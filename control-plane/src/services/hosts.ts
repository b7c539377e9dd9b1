import type { Hello, ObservedInstance } from "@offshoot/shared";
import { and, asc, eq, inArray, isNull, lt, lte, notInArray, or, sql } from "drizzle-orm";
import { isConnectionLost, now, statement, transaction } from "../db/client.ts";
import { events, hosts, instances, operations } from "../db/schema/index.ts";
import { hostGrace, type Services, topics } from "./context.ts";
import { applyObserved, insertOperations, newOperation } from "./operations.ts";

/** Deletes of instances a host runs that it has no row for, pending at once per host. */
export const MAX_ORPHAN_DELETES = 256;

/**
 * An agent said hello: record what it offers, and reconcile our rows with what it actually
 * runs (the host is the source of truth for that). Then re-send every command still pending
 * for it; the agent answers ones it already ran from its journal.
 */
export async function hostConnected(
  s: Services,
  hostId: string,
  hello: Hello,
  connectedAt: Date,
): Promise<void> {
  const seen = new Map(hello.inventory.map((o) => [o.id, o]));
  const { changed, orphans, unheeded } = await transaction(s.db, async (tx) => {
    // Lock order everywhere: instance rows (by id) before host rows; the host row is last here.
    const rows = await tx
      .select({ id: instances.id, state: instances.state })
      .from(instances)
      .where(eq(instances.hostId, hostId));
    const pending = await s.ops.pendingTargets(tx, hostId);
    const known: ObservedInstance[] = [];
    const missing: string[] = [];
    for (const r of rows) {
      const o = seen.get(r.id);
      if (o) known.push(o);
      else if (!pending.has(r.id) && r.state !== "Created") missing.push(r.id);
    }
    known.sort((a, b) => (a.id < b.id ? -1 : 1));
    missing.sort();
    const changed = await applyObserved(tx, hostId, known, "host.hello");
    if (missing.length > 0) {
      await tx
        .update(instances)
        .set({
          state: "Unknown",
          stateError: "the host has no record of this instance",
          version: sql`${instances.version} + 1`,
        })
        .where(inArray(instances.id, missing));
      changed.push(...missing);
    }
    const rowIds = new Set(rows.map((r) => r.id));
    // An instance the host runs that no row of this host owns (e.g. its create was rolled back
    // while the host was away) is deleted on the host, so it cannot hold resources forever.
    // Another host's instance is no different: its row is that host's alone (see
    // Operations.complete), so a host learns nothing and deletes nothing but its own guests.
    // A host may claim any ids it likes: deletes already pending are not made again, and at
    // most MAX_ORPHAN_DELETES are pending per host (the rest follow on later hellos).
    const orphans = hello.inventory.filter((o) => !rowIds.has(o.id) && !pending.has(o.id));
    const deletes = [];
    if (orphans.length > 0) {
      const queued = await tx
        .select({ id: sql<string>`${operations.payload}->>'instance_id'` })
        .from(operations)
        .where(
          and(
            eq(operations.hostId, hostId),
            eq(operations.status, "pending"),
            eq(operations.kind, "delete"),
            isNull(operations.instanceId),
          ),
        );
      const already = new Set(queued.map((q) => q.id));
      const room = Math.max(0, MAX_ORPHAN_DELETES - already.size);
      const fresh = orphans.filter((x) => !already.has(x.id)).slice(0, room);
      // Two statements for all of them, not two per orphan.
      for (const o of fresh) {
        deletes.push(
          newOperation({
            tenantId: null,
            hostId,
            instanceId: null,
            lock: "none",
            payload: { kind: "delete", instance_id: o.id },
          }),
        );
      }
      if (fresh.length > 0) {
        await statement(tx, insertOperations(deletes));
        await tx.insert(events).values(
          fresh.map((o) => ({
            hostId,
            instanceId: o.id,
            type: "host.orphan",
            data: { state: o.state },
          })),
        );
      }
    }
    await tx
      .update(hosts)
      .set({
        status: "online",
        driver: hello.driver,
        agentVersion: hello.agent_version,
        capabilities: hello.capabilities,
        images: hello.images,
        vcpus: hello.capacity.vcpus,
        memoryBytes: hello.capacity.memory_bytes,
        lastSeenAt: now,
        connectedAt,
      })
      .where(eq(hosts.id, hostId));
    return { changed, orphans: deletes, unheeded: orphans.length };
  });
  for (const id of changed) s.signals.notify(topics.instance(id));
  const resent = await s.ops.resendPending(hostId);
  s.log("info", "host connected", {
    host_id: hostId,
    inventory: hello.inventory.length,
    resent,
    orphans: unheeded,
    orphan_deletes: orphans.length,
  });
}

export async function hostDisconnected(
  s: Services,
  hostId: string,
  connectedAt: Date,
): Promise<void> {
  // Only if no newer connection of the same host has been recorded since.
  await s.db
    .update(hosts)
    .set({ status: "offline" })
    .where(
      and(eq(hosts.id, hostId), or(isNull(hosts.connectedAt), lte(hosts.connectedAt, connectedAt))),
    );
}

/**
 * Heartbeats are folded into one UPDATE per flush, whatever the number of hosts (rows locked
 * in id order, as everywhere). Returns the hosts that were marked offline meanwhile: their
 * agents must say hello again before their instances can be trusted.
 */
export async function recordHeartbeats(s: Services, hostIds: string[]): Promise<string[]> {
  if (hostIds.length === 0) return [];
  const rows = await transaction(s.db, async (tx) => {
    const locked = await tx
      .select({ id: hosts.id, status: hosts.status })
      .from(hosts)
      .where(inArray(hosts.id, hostIds))
      .orderBy(asc(hosts.id))
      .for("update");
    await tx.update(hosts).set({ lastSeenAt: now }).where(inArray(hosts.id, hostIds));
    return locked;
  });
  return rows.filter((r) => r.status !== "online").map((r) => r.id);
}

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
        version: sql`${instances.version} + 1`,
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
