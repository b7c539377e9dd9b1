// hello: the agent's full report on (re)connecting. What it offers is recorded on the host row,
// our rows are reconciled with what it actually runs (the host is the source of truth for
// that), what it holds that no row names is deleted on it, and every command still pending for
// it is sent again.
import {
  type Hello,
  type ObservedInstance,
  PROTOCOL_VERSION,
  type Welcome,
} from "@offshoot/shared";
import { and, eq, inArray, isNull, lte, or, sql } from "drizzle-orm";
import { now, statement, type Tx, transaction } from "../../db/client.ts";
import { events, hosts, instances, operations, snapshots } from "../../db/schema/index.ts";
import { type Services, topics } from "../context.ts";
import { applyObserved, insertOperations, newOperation } from "../operations.ts";

/** Deletes of instances a host runs that it has no row for, pending at once per host; as many
 * again of snapshots it holds that it has no row for. */
export const MAX_ORPHAN_DELETES = 256;

/** The answer to a hello: the host's id and how often it must send a heartbeat. */
export const welcome = (s: Services, hostId: string): Welcome => ({
  v: PROTOCOL_VERSION,
  type: "welcome",
  host_id: hostId,
  heartbeat_ms: s.env.HEARTBEAT_MS,
});

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
  const { changed, orphans, unheeded, lostSnapshots } = await transaction(s.db, async (tx) => {
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
    const states = new Map(orphans.map((o) => [o.id, o.state]));
    const deletes = await queueOrphanDeletes(tx, hostId, "delete", [...states.keys()]);
    if (deletes.length > 0) {
      await tx.insert(events).values(
        deletes.map((id) => ({
          hostId,
          instanceId: id,
          type: "host.orphan",
          data: { state: states.get(id) },
        })),
      );
    }
    const lostSnapshots = hello.snapshots ? await orphanSnapshots(tx, hostId, hello.snapshots) : [];
    await tx
      .update(hosts)
      .set({
        status: "online",
        driver: hello.driver,
        agentVersion: hello.agent_version,
        capabilities: hello.capabilities,
        images: hello.images,
        imageDigests: hello.image_digests,
        vcpus: hello.capacity.vcpus,
        memoryBytes: hello.capacity.memory_bytes,
        lastSeenAt: now,
        connectedAt,
      })
      .where(eq(hosts.id, hostId));
    return { changed, orphans: deletes, unheeded: orphans.length, lostSnapshots };
  });
  for (const id of changed) s.signals.notify(topics.instance(id));
  const resent = await s.ops.resendPending(hostId);
  s.log("info", "host connected", {
    host_id: hostId,
    inventory: hello.inventory.length,
    resent,
    orphans: unheeded,
    orphan_deletes: orphans.length,
    orphan_snapshot_deletes: lostSnapshots.length,
  });
}

/** The agent's socket closed: the host is offline, unless it has connected again since. */
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
 * Snapshots the host holds that no row of this host names (a snapshot row goes before its
 * capture is sent, and goes away only when its host has deleted it, its capture failed, or its
 * tenant was deleted): each gets a snapshot_delete. Returns the ids queued.
 */
async function orphanSnapshots(tx: Tx, hostId: string, held: readonly string[]): Promise<string[]> {
  if (held.length === 0) return [];
  const rows = await tx
    .select({ id: snapshots.id })
    .from(snapshots)
    .where(and(eq(snapshots.hostId, hostId), inArray(snapshots.id, [...held])));
  const known = new Set(rows.map((r) => r.id));
  return queueOrphanDeletes(
    tx,
    hostId,
    "snapshot_delete",
    held.filter((id) => !known.has(id)),
  );
}

/**
 * A host's own delete (`delete` of an instance, `snapshot_delete`) of each id, except those
 * already pending, at most MAX_ORPHAN_DELETES pending per host and kind (the rest follow on
 * later hellos), in one statement. Returns the ids queued.
 */
async function queueOrphanDeletes(
  tx: Tx,
  hostId: string,
  kind: "delete" | "snapshot_delete",
  ids: readonly string[],
): Promise<string[]> {
  if (ids.length === 0) return [];
  const key = sql.raw(kind === "delete" ? "'instance_id'" : "'snapshot_id'");
  const queued = await tx
    .select({ id: sql<string>`${operations.payload}->>${key}` })
    .from(operations)
    .where(
      and(
        eq(operations.hostId, hostId),
        eq(operations.status, "pending"),
        eq(operations.kind, kind),
        isNull(operations.instanceId),
      ),
    );
  const already = new Set(queued.map((q) => q.id));
  const room = Math.max(0, MAX_ORPHAN_DELETES - already.size);
  const fresh = ids.filter((id) => !already.has(id)).slice(0, room);
  const ops = fresh.map((id) =>
    newOperation({
      tenantId: null,
      hostId,
      instanceId: null,
      lock: "none",
      payload: kind === "delete" ? { kind, instance_id: id } : { kind, snapshot_id: id },
    }),
  );
  if (ops.length > 0) await statement(tx, insertOperations(ops));
  return fresh;
}
