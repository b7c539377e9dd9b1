import type { Hello, ObservedInstance } from "@offshoot/shared";
import { and, eq, inArray, isNull, lt, lte, ne, notInArray, or, sql } from "drizzle-orm";
import { events, hosts, instances } from "../db/schema/index.ts";
import { type Services, topics } from "./context.ts";
import { applyObserved } from "./operations.ts";

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
  const { changed, orphans } = await s.db.transaction(async (tx) => {
    await tx
      .update(hosts)
      .set({
        status: "online",
        driver: hello.driver,
        agentVersion: hello.agent_version,
        capabilities: hello.capabilities,
        vcpus: hello.capacity.vcpus,
        memoryBytes: hello.capacity.memory_bytes,
        lastSeenAt: new Date(),
        connectedAt,
      })
      .where(eq(hosts.id, hostId));
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
    const orphans = hello.inventory.filter((o) => !rowIds.has(o.id) && !pending.has(o.id));
    const deletes = [];
    for (const o of orphans) {
      // An instance the host runs that no tenant owns (e.g. its create was rolled back while
      // the host was away): delete it so it cannot hold resources or a name forever.
      deletes.push(
        await s.ops.insert(tx, {
          tenantId: null,
          hostId,
          instanceId: null,
          lock: "none",
          payload: { kind: "delete", instance_id: o.id },
        }),
      );
      await tx.insert(events).values({
        hostId,
        instanceId: o.id,
        type: "host.orphan",
        data: { state: o.state },
      });
    }
    return { changed, orphans: deletes };
  });
  for (const id of changed) s.signals.notify(topics.instance(id));
  const resent = await s.ops.resendPending(hostId);
  s.log("info", "host connected", {
    host_id: hostId,
    inventory: hello.inventory.length,
    resent,
    orphans: orphans.length,
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

/** Heartbeats are folded into one UPDATE per flush, whatever the number of hosts. */
export async function recordHeartbeats(s: Services, hostIds: string[]): Promise<void> {
  if (hostIds.length === 0) return;
  await s.db.update(hosts).set({ lastSeenAt: new Date() }).where(inArray(hosts.id, hostIds));
}

/**
 * Hosts silent for longer than the grace period go offline and their instances Unknown,
 * with the reason in state_error. They converge on the host's next hello.
 */
export async function sweepSilentHosts(s: Services): Promise<number> {
  const cutoff = sql`now() - make_interval(secs => ${s.env.HOST_GRACE_MS / 1000})`;
  const changed = await s.db.transaction(async (tx) => {
    const silent = await tx
      .select({ id: hosts.id, name: hosts.name, lastSeenAt: hosts.lastSeenAt })
      .from(hosts)
      .where(or(isNull(hosts.lastSeenAt), lt(hosts.lastSeenAt, cutoff)));
    if (silent.length === 0) return [];
    await tx
      .update(hosts)
      .set({ status: "offline" })
      .where(
        and(
          inArray(
            hosts.id,
            silent.map((h) => h.id),
          ),
          eq(hosts.status, "online"),
        ),
      );
    const ids: string[] = [];
    for (const h of silent) {
      const since = h.lastSeenAt ? h.lastSeenAt.toISOString() : "never";
      const rows = await tx
        .update(instances)
        .set({
          state: "Unknown",
          stateError: `host ${h.name} has not been heard from since ${since}`,
          version: sql`${instances.version} + 1`,
        })
        .where(
          and(
            eq(instances.hostId, h.id),
            ne(instances.state, "Unknown"),
            notInArray(instances.state, ["Created"]),
          ),
        )
        .returning({ id: instances.id, tenantId: instances.tenantId });
      for (const r of rows) {
        await tx.insert(events).values({
          tenantId: r.tenantId,
          instanceId: r.id,
          hostId: h.id,
          type: "instance.state",
          data: { to: "Unknown", cause: "host.silent" },
        });
        ids.push(r.id);
      }
    }
    return ids;
  });
  for (const id of changed) s.signals.notify(topics.instance(id));
  return changed.length;
}
