// Snapshots as resources: capture (POST /instances/{id}/snapshots), list, get, delete, fork from
// one (POST /snapshots/{id}/fork) and restore an instance to one. A snapshot lives on its
// source's host, and forks from it are placed there. Capturing a Running instance is the fork's
// from_running flow with a snapshot as its target (standby, capture, restore); a Stopped or
// Standby one is one host command. Rows are listed once their host has made them ("ready").
import {
  COMPRESSION_LEVELS,
  ConflictError,
  type CreateSnapshotRequest,
  type ForkSnapshotRequest,
  type ForkTargetState,
  type Instance,
  InvalidRequestError,
  InvalidStateError,
  NotFoundError,
  NotSupportedError,
  type Operation,
  type RestoreSnapshotRequest,
  type Snapshot,
  type SnapshotKind,
  type Tags,
} from "@offshoot/shared";
import { and, asc, eq, sql } from "drizzle-orm";
import {
  type Executor,
  insertRows,
  issued,
  pgErrorCode,
  statement,
  type Tx,
  transactionEndingWith,
} from "../db/client.ts";
import {
  type OperationRow,
  type ResolvedCompression,
  type SnapshotRow,
  snapshots,
} from "../db/schema/index.ts";
import { type Call, hostGrace, newCall, type Services } from "./context.ts";
import { nameConflict, nameInUse, nameTaken } from "./instances/errors.ts";
import { awaitFlow, forkResult, forkTarget, recordForkFlow } from "./instances/fork.ts";
import { newInstanceId } from "./instances/ids.ts";
import { assertIdle, lockChecked } from "./instances/lifecycle.ts";
import { present } from "./instances/present.ts";
import { rowAfter } from "./instances/resolve.ts";
import { freeAddress, noAddress } from "./network.ts";
import { insertOperations, newOperation, strongestHold } from "./operations.ts";
import { admitLocked, lockOnlineHost, overcommitOf } from "./placement.ts";

export function presentSnapshot(r: SnapshotRow): Snapshot {
  return {
    id: r.id,
    name: r.name,
    kind: r.kind,
    tags: r.tags,
    source_instance_id: r.sourceInstanceId,
    source_instance_name: r.sourceInstanceName,
    source_hypervisor: r.sourceHypervisor as Snapshot["source_hypervisor"],
    created_at: r.createdAt.toISOString(),
    size_bytes: r.sizeBytes,
    compression_state: r.compressionState,
    compression_error: r.compressionError,
    ...(r.compression && { compression: r.compression }),
    compressed_size_bytes: r.compressedSizeBytes,
    uncompressed_size_bytes: r.uncompressedSizeBytes,
  };
}

/** The compression a snapshot asked for, algorithm and level filled in; null for none. Only a
 * Standby snapshot has memory to compress. */
function compressionOf(req: CreateSnapshotRequest): ResolvedCompression | null {
  const c = req.compression;
  if (!c?.enabled) return null;
  if (req.kind !== "Standby") {
    throw new InvalidRequestError(
      "compression applies to Standby snapshots: a Stopped snapshot holds no memory",
    );
  }
  const algorithm = c.algorithm ?? "zstd";
  return { enabled: true, algorithm, level: c.level ?? COMPRESSION_LEVELS[algorithm].default };
}

const notFound = (id: string) => new NotFoundError(`snapshot ${id} not found`);

/** A name used by another snapshot of the same source: Hypeman's 409. */
function snapshotNameConflict(err: unknown, name: string | undefined): never {
  const { code, constraint } = pgErrorCode(err);
  if (code === "23505" && constraint === "snapshots_source_name_uq") {
    throw new ConflictError(`the instance already has a snapshot named ${name}`);
  }
  throw err;
}

/**
 * POST /instances/{id}/snapshots. Standby: of a Running instance (paused only while its
 * snapshot is taken, then restored: the instance stays Running) or of a Standby one (sharing
 * its snapshot's files). Stopped: the disk of a Stopped instance. The answer comes once the
 * host has made it.
 */
export async function createSnapshot(
  s: Services,
  tenantId: string,
  ref: string,
  req: CreateSnapshotRequest,
  call: Call = newCall(s),
  { scheduled = false } = {},
): Promise<Snapshot> {
  const compression = compressionOf(req);
  const { snap, op, flow } = await transactionEndingWith(s.db, async (tx) => {
    const { row: src, held, host: lockedHost } = await lockChecked(tx, hostGrace(s), tenantId, ref);
    const allowed: Record<SnapshotKind, readonly string[]> = {
      Standby: ["Running", "Standby"],
      Stopped: ["Stopped"],
    };
    if (!allowed[req.kind].includes(src.state)) {
      throw new InvalidStateError(
        `invalid state transition: ${req.kind.toLowerCase()} snapshot requires source in ${allowed[req.kind].join(" or ")}, got ${src.state}`,
      );
    }
    const fromRunning = src.state === "Running";
    assertIdle(src, fromRunning ? "exclusive" : "shared", held);
    const host = await admitLocked(tx, lockedHost, src.hostId, undefined, overcommitOf(s.env));
    const caps = host.capabilities;
    const can =
      req.kind === "Standby" ? caps?.fork_from_standby && caps.standby : caps?.fork_from_stopped;
    if (!can) {
      throw new NotSupportedError(
        `host ${host.name} (${host.driver}) cannot take a ${req.kind} snapshot`,
      );
    }
    if (compression && !caps?.snapshot_compression) {
      throw new NotSupportedError(
        `host ${host.name} (${host.driver}) cannot compress snapshots (it lacks zstd and lz4)`,
      );
    }
    const snap: SnapshotRow = {
      id: newInstanceId(),
      tenantId,
      hostId: src.hostId,
      name: req.name ?? null,
      kind: req.kind,
      tags: req.tags ?? {},
      sourceInstanceId: src.id,
      sourceInstanceName: src.name,
      sourceHypervisor: src.hypervisor,
      source: src,
      status: "creating",
      sizeBytes: 0,
      operationId: null,
      scheduled,
      compression,
      compressionState: compression ? "compressing" : "none",
      compressionError: null,
      compressedSizeBytes: null,
      uncompressedSizeBytes: null,
      createdAt: new Date(),
    };
    const owned = { tenantId, hostId: src.hostId, instanceId: null, sourceInstanceId: src.id };
    const op = fromRunning
      ? newOperation({
          ...owned,
          lock: "exclusive",
          payload: {
            kind: "fork_flow",
            source_id: src.id,
            target_id: snap.id,
            from_running: true,
            target_state: "Standby",
            snapshot: true,
          },
        })
      : newOperation({
          ...owned,
          lock: "shared",
          payload: {
            kind: "snapshot_create",
            instance_id: src.id,
            snapshot_id: snap.id,
            snapshot_kind: req.kind,
          },
        });
    snap.operationId = op.id;
    const written = issued(
      statement(tx, sql`with s as (${insertRows(snapshots, [snap])}) ${insertOperations([op])}`),
    );
    return { value: { snap, op, flow: fromRunning }, last: [written] };
  }).catch((e: unknown) => snapshotNameConflict(e, req.name));

  if (flow) await awaitFlow(s, op, [], call, "snapshot");
  else await s.ops.run(op, call);
  return presentSnapshot(await getReady(s.db, tenantId, snap.id));
}

async function getReady(ex: Executor, tenantId: string, id: string): Promise<SnapshotRow> {
  const [row] = await ex
    .select()
    .from(snapshots)
    .where(
      and(eq(snapshots.id, id), eq(snapshots.tenantId, tenantId), eq(snapshots.status, "ready")),
    );
  if (!row) throw notFound(id);
  return row;
}

export async function getSnapshot(s: Services, tenantId: string, id: string): Promise<Snapshot> {
  return presentSnapshot(await getReady(s.db, tenantId, id));
}

export interface SnapshotFilter {
  source_instance_id?: string;
  kind?: SnapshotKind;
  name?: string;
  tags?: Tags;
}

/** A tenant's snapshots, oldest first. At most LIST_LIMIT. */
export const SNAPSHOT_LIST_LIMIT = 1000;
export async function listSnapshots(
  s: Services,
  tenantId: string,
  f: SnapshotFilter,
): Promise<Snapshot[]> {
  const rows = await s.db
    .select()
    .from(snapshots)
    .where(
      and(
        eq(snapshots.tenantId, tenantId),
        eq(snapshots.status, "ready"),
        f.source_instance_id ? eq(snapshots.sourceInstanceId, f.source_instance_id) : undefined,
        f.kind ? eq(snapshots.kind, f.kind) : undefined,
        f.name ? eq(snapshots.name, f.name) : undefined,
        f.tags && Object.keys(f.tags).length > 0
          ? sql`${snapshots.tags} @> ${JSON.stringify(f.tags)}::jsonb`
          : undefined,
      ),
    )
    .orderBy(asc(snapshots.createdAt), asc(snapshots.id))
    .limit(SNAPSHOT_LIST_LIMIT);
  return rows.map(presentSnapshot);
}

/** Locks a ready snapshot of the tenant: `share` for a fork or restore reading it, `update` for
 * its delete. */
async function lockSnapshot(
  tx: Tx,
  tenantId: string,
  id: string,
  mode: "share" | "update",
): Promise<SnapshotRow> {
  const [row] = await tx
    .select()
    .from(snapshots)
    .where(
      and(eq(snapshots.id, id), eq(snapshots.tenantId, tenantId), eq(snapshots.status, "ready")),
    )
    .for(mode);
  if (!row) throw notFound(id);
  return row;
}

/**
 * DELETE /snapshots/{id}. Its forks keep working: they hold the memory and disk bases they
 * map, not the snapshot. Refused while a fork from it or a restore to it is in progress.
 */
export async function deleteSnapshot(
  s: Services,
  tenantId: string,
  id: string,
  call: Call = newCall(s),
): Promise<void> {
  const op = await transactionEndingWith(s.db, async (tx) => {
    const snap = await lockSnapshot(tx, tenantId, id, "update");
    const held = await strongestHold(tx, snap.id);
    if (held) {
      throw new InvalidStateError(
        `snapshot ${id} is in use by a ${held.kind === "fork_flow" ? "fork" : held.kind} in progress (operation ${held.id}); retry when it finishes`,
      );
    }
    const op = newOperation({
      tenantId,
      hostId: snap.hostId,
      instanceId: null,
      lock: "none",
      payload: { kind: "snapshot_delete", snapshot_id: snap.id },
    });
    await tx.update(snapshots).set({ status: "deleting" }).where(eq(snapshots.id, snap.id));
    return { value: op, last: [issued(statement(tx, insertOperations([op])))] };
  });
  await s.ops.run(op, call);
}

/** A snapshot's target state: given, else Running for a Standby snapshot and Stopped for a
 * Stopped one (Hypeman's defaults). */
const targetOf = (snap: SnapshotRow, given: ForkTargetState | undefined): ForkTargetState =>
  given ?? (snap.kind === "Standby" ? "Running" : "Stopped");

function checkHypervisor(snap: SnapshotRow, want: string | undefined) {
  if (want !== undefined && want !== snap.sourceHypervisor) {
    throw new NotSupportedError(
      `snapshot ${snap.id} was taken with ${snap.sourceHypervisor}; moving it to ${want} is not supported`,
    );
  }
}

/**
 * POST /snapshots/{id}/fork: a new instance from the snapshot, on its host, with the rules of
 * an instance fork — its own name (409 if taken), a new id, MAC and IP, the source's settings
 * as they were at capture — and, from a Standby snapshot, the snapshot's memory.
 */
export async function forkSnapshot(
  s: Services,
  tenantId: string,
  id: string,
  req: ForkSnapshotRequest,
  call: Call = newCall(s),
): Promise<Instance> {
  const { flow, children } = await transactionEndingWith(s.db, async (tx) => {
    const snap = await lockSnapshot(tx, tenantId, id, "share");
    checkHypervisor(snap, req.target_hypervisor);
    const targetState = targetOf(snap, req.target_state);
    const src = snap.source;
    const writable = src.volumes.find((v) => !v.readonly);
    if (writable) {
      throw new ConflictError(
        `cannot fork snapshot ${id}: its instance had volume ${writable.volume_id} attached writable at ${writable.mount_path}, and a writable volume cannot be shared by two instances`,
      );
    }
    const [taken, lockedHost] = await Promise.all([
      nameInUse(tx, tenantId, req.name),
      lockOnlineHost(tx, hostGrace(s), snap.hostId),
    ]);
    if (taken) throw nameTaken(req.name);
    const need = { vcpus: src.vcpus, memoryBytes: src.memoryBytes + src.hotplugBytes };
    const host = await admitLocked(
      tx,
      lockedHost,
      snap.hostId,
      targetState === "Running" ? need : undefined,
      overcommitOf(s.env),
    );
    const ip = src.networkEnabled ? await freeAddress(tx, snap.hostId) : null;
    if (src.networkEnabled && !ip) throw noAddress(host.name);
    const target = { ...forkTarget(src, req.name, ip), tenantId, hostId: snap.hostId };
    return recordForkFlow(
      tx,
      target,
      {
        kind: "fork_flow",
        source_id: snap.id,
        target_id: target.id,
        from_running: false,
        target_state: targetState,
        from_snapshot: true,
      },
      "shared",
      host.subnet,
    );
  }).catch((e: unknown) => nameConflict(e, req.name));
  return forkResult(s, tenantId, flow, children, call);
}

/**
 * POST /instances/{id}/snapshots/{snapshotId}/restore: the instance goes back to one of its own
 * snapshots — its disk, and for a Standby snapshot its memory — keeping its id, name, MAC and
 * address. 409 while it is Running (stop it or put it in standby first), as in Hypeman.
 */
export async function restoreSnapshot(
  s: Services,
  tenantId: string,
  ref: string,
  snapshotId: string,
  req: RestoreSnapshotRequest,
  call: Call = newCall(s),
): Promise<Instance> {
  const op = await transactionEndingWith(s.db, async (tx) => {
    const snap = await lockSnapshot(tx, tenantId, snapshotId, "share");
    // Room is asked for only when the instance will run.
    const targetState = targetOf(snap, req.target_state);
    const {
      row,
      held,
      host: lockedHost,
      used,
    } = await lockChecked(tx, hostGrace(s), tenantId, ref, {
      ...(targetState === "Running" && { usage: "others" }),
    });
    if (snap.sourceInstanceId !== row.id) {
      throw new InvalidRequestError(
        `snapshot ${snapshotId} was taken of instance ${snap.sourceInstanceName}, not ${row.name}; fork it instead`,
      );
    }
    checkHypervisor(snap, req.target_hypervisor);
    if (row.state !== "Stopped" && row.state !== "Standby") {
      throw new InvalidStateError(
        `cannot restore instance ${row.name} to a snapshot: it is ${row.state}, and restore needs Stopped or Standby`,
      );
    }
    assertIdle(row, "exclusive", held);
    await admitLocked(
      tx,
      lockedHost,
      row.hostId,
      targetState === "Running"
        ? { vcpus: row.vcpus, memoryBytes: row.memoryBytes + row.hotplugBytes }
        : undefined,
      overcommitOf(s.env),
      row.id,
      used,
    );
    const payload: Operation = {
      kind: "snapshot_restore",
      instance_id: row.id,
      snapshot_id: snap.id,
      target_state: targetState,
    };
    const op: OperationRow = newOperation({
      tenantId,
      hostId: row.hostId,
      instanceId: row.id,
      sourceInstanceId: snap.id,
      lock: "exclusive",
      payload,
    });
    return { value: op, last: [issued(statement(tx, insertOperations([op])))] };
  });
  await s.ops.run(op, call);
  return present(await rowAfter(s, tenantId, op.id, op.instanceId ?? ""));
}
