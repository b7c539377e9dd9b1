// Snapshot schedules: GET/PUT/DELETE /instances/{id}/snapshot-schedule, and the runner every
// Node replica ticks (and the Workers cron calls). A due schedule is claimed by one UPDATE that
// moves next_run_at past now, so whoever claims a due time runs it and nobody else can; a
// schedule whose runs were missed (every replica down) runs once and carries on from now.
// A run takes a Standby snapshot of a Running or Standby instance and a Stopped one of a
// Stopped instance, named `<prefix>-<due time>`, then applies the retention to the instance's
// scheduled snapshots.
import {
  InvalidRequestError,
  NotFoundError,
  parseDuration,
  type SetSnapshotScheduleRequest,
  type SnapshotKind,
  type SnapshotSchedule,
} from "@offshoot/shared";
import { and, desc, eq, sql } from "drizzle-orm";
import { rowFromJson, statement } from "../db/client.ts";
import { type SnapshotScheduleRow, snapshotSchedules, snapshots } from "../db/schema/index.ts";
import { newCall, type Services } from "./context.ts";
import { resolveInstance } from "./instances/resolve.ts";
import { createSnapshot, deleteSnapshot } from "./snapshots.ts";

/** Due schedules claimed per tick; the rest wait for the next one. */
export const SCHEDULE_CLAIM_LIMIT = 100;
/** Scheduled runs at once per process. */
export const SCHEDULE_CONCURRENCY = 4;
const MIN_INTERVAL_MS = 60_000;

/** A schedule duration in milliseconds of this deployment's clock: SNAPSHOT_SCHEDULE_MINUTE_MS
 * is how long a minute of a schedule lasts (60,000 unless a test shortens it). */
function scaled(s: Services, duration: string, what: string): number {
  return Math.round(
    (parseDurationOr400(duration, what) * s.env.SNAPSHOT_SCHEDULE_MINUTE_MS) / 60_000,
  );
}

const iso = (d: Date | null) => (d ? d.toISOString() : null);

export function presentSchedule(r: SnapshotScheduleRow): SnapshotSchedule {
  return {
    instance_id: r.instanceId,
    interval: r.interval,
    name_prefix: r.namePrefix,
    metadata: r.metadata,
    retention: {
      ...(r.maxCount !== null && { max_count: r.maxCount }),
      ...(r.maxAge !== null && { max_age: r.maxAge }),
    },
    next_run_at: r.nextRunAt.toISOString(),
    last_run_at: iso(r.lastRunAt),
    last_snapshot_id: r.lastSnapshotId,
    last_error: r.lastError,
    created_at: r.createdAt.toISOString(),
    updated_at: r.updatedAt.toISOString(),
  };
}

async function scheduleOf(s: Services, tenantId: string, ref: string) {
  const inst = await resolveInstance(s.db, tenantId, ref);
  const [row] = await s.db
    .select()
    .from(snapshotSchedules)
    .where(eq(snapshotSchedules.instanceId, inst.id));
  return { inst, row };
}

export async function getSchedule(
  s: Services,
  tenantId: string,
  ref: string,
): Promise<SnapshotSchedule> {
  const { inst, row } = await scheduleOf(s, tenantId, ref);
  if (!row) throw new NotFoundError(`instance ${inst.name} has no snapshot schedule`);
  return presentSchedule(row);
}

/** Creates or replaces the schedule. A new interval starts a new cadence (first run one
 * interval from now); changing only the rest keeps the next run. */
export async function setSchedule(
  s: Services,
  tenantId: string,
  ref: string,
  req: SetSnapshotScheduleRequest,
): Promise<SnapshotSchedule> {
  if (parseDurationOr400(req.interval, "interval") < MIN_INTERVAL_MS) {
    throw new InvalidRequestError(`interval must be at least 1m, got ${req.interval}`);
  }
  const { max_count, max_age } = req.retention;
  if (max_count === undefined && max_age === undefined) {
    throw new InvalidRequestError("retention needs max_count or max_age (or both)");
  }
  const intervalMs = scaled(s, req.interval, "interval");
  const maxAgeMs = max_age === undefined ? null : scaled(s, max_age, "retention.max_age");
  const { inst } = await scheduleOf(s, tenantId, ref);
  const values = {
    instanceId: inst.id,
    tenantId,
    interval: req.interval,
    intervalMs,
    namePrefix: req.name_prefix ?? null,
    metadata: req.metadata ?? {},
    maxCount: max_count ?? null,
    maxAge: max_age ?? null,
    maxAgeMs,
    nextRunAt: sql`now() + ${intervalMs} * interval '1 millisecond'`,
    updatedAt: sql`now()`,
  };
  const [row] = await s.db
    .insert(snapshotSchedules)
    .values(values as never)
    .onConflictDoUpdate({
      target: snapshotSchedules.instanceId,
      set: {
        ...values,
        nextRunAt: sql`case when ${snapshotSchedules.intervalMs} = excluded.interval_ms
          then ${snapshotSchedules.nextRunAt} else excluded.next_run_at end`,
        createdAt: sql`${snapshotSchedules.createdAt}`,
      } as never,
    })
    .returning();
  if (!row) throw new Error("schedule upsert returned no row");
  return presentSchedule(row);
}

function parseDurationOr400(d: string, what: string): number {
  try {
    return parseDuration(d);
  } catch (e) {
    throw new InvalidRequestError(`${what}: ${(e as Error).message}`);
  }
}

export async function deleteSchedule(s: Services, tenantId: string, ref: string): Promise<void> {
  const inst = await resolveInstance(s.db, tenantId, ref);
  const gone = await s.db
    .delete(snapshotSchedules)
    .where(eq(snapshotSchedules.instanceId, inst.id))
    .returning({ id: snapshotSchedules.instanceId });
  if (gone.length === 0) throw new NotFoundError(`instance ${inst.name} has no snapshot schedule`);
}

interface Claimed {
  row: SnapshotScheduleRow;
  dueAt: Date;
}

/** Claims the schedules due now: each moved on to its first due time after now, in one
 * statement, rows another runner is claiming skipped. */
async function claimDue(s: Services): Promise<Claimed[]> {
  const rows = await statement(
    s.db,
    sql`with due as (
      select instance_id, next_run_at from snapshot_schedules
      where next_run_at <= now() order by next_run_at limit ${SCHEDULE_CLAIM_LIMIT}
      for update skip locked
    )
    update snapshot_schedules t set
      next_run_at = due.next_run_at + (floor(extract(epoch from (now() - due.next_run_at)) * 1000
        / t.interval_ms) + 1) * t.interval_ms * interval '1 millisecond',
      last_run_at = now(), updated_at = now()
    from due where t.instance_id = due.instance_id
    returning to_jsonb(t.*) as row, due.next_run_at as due_at`,
  );
  return rows.map((r) => ({
    row: rowFromJson(snapshotSchedules, r.row as Record<string, unknown>),
    dueAt: new Date(r.due_at as string | Date),
  }));
}

/** `20261203-021500`: a due time as a name part (UTC, to the second). */
const stamp = (d: Date) =>
  d
    .toISOString()
    .replace(/[-:]/g, "")
    .replace("T", "-")
    .replace(/\.\d+Z$/, "")
    .toLowerCase();

/** Runs the schedules due now (those this caller claims), at most SCHEDULE_CONCURRENCY at
 * once. Resolves the number run. */
export async function runDueSchedules(s: Services): Promise<number> {
  const claimed = await claimDue(s);
  let next = 0;
  const worker = async () => {
    for (let c = claimed[next++]; c; c = claimed[next++]) await runOne(s, c);
  };
  await Promise.all(Array.from({ length: SCHEDULE_CONCURRENCY }, worker));
  return claimed.length;
}

async function runOne(s: Services, { row, dueAt }: Claimed): Promise<void> {
  const outcome: { lastSnapshotId?: string; lastError: string | null } = { lastError: null };
  try {
    const inst = await resolveInstance(s.db, row.tenantId, row.instanceId);
    const kind: SnapshotKind | undefined =
      inst.state === "Stopped"
        ? "Stopped"
        : inst.state === "Running" || inst.state === "Standby"
          ? "Standby"
          : undefined;
    if (!kind) throw new Error(`cannot snapshot instance ${inst.name} while it is ${inst.state}`);
    const snap = await createSnapshot(
      s,
      row.tenantId,
      row.instanceId,
      { kind, name: `${row.namePrefix ?? "scheduled"}-${stamp(dueAt)}`, tags: row.metadata },
      newCall(s),
      { scheduled: true },
    );
    outcome.lastSnapshotId = snap.id;
  } catch (e) {
    outcome.lastError = e instanceof Error ? e.message : String(e);
    s.log("warn", "scheduled snapshot failed", {
      instance: row.instanceId,
      error: outcome.lastError,
    });
  }
  await s.db
    .update(snapshotSchedules)
    .set({ ...outcome, updatedAt: new Date() })
    .where(eq(snapshotSchedules.instanceId, row.instanceId));
  await applyRetention(s, row).catch((e: unknown) =>
    s.log("warn", "snapshot retention failed", { instance: row.instanceId, error: String(e) }),
  );
}

/** Deletes the instance's scheduled snapshots beyond max_count (newest kept) or older than
 * max_age. Snapshots taken by hand are never touched. */
async function applyRetention(s: Services, row: SnapshotScheduleRow): Promise<void> {
  const kept = await s.db
    .select({ id: snapshots.id, createdAt: snapshots.createdAt })
    .from(snapshots)
    .where(
      and(
        eq(snapshots.sourceInstanceId, row.instanceId),
        eq(snapshots.tenantId, row.tenantId),
        eq(snapshots.scheduled, true),
        eq(snapshots.status, "ready"),
      ),
    )
    .orderBy(desc(snapshots.createdAt), desc(snapshots.id));
  const oldest = row.maxAgeMs === null ? null : Date.now() - row.maxAgeMs;
  const doomed = kept.filter(
    (k, i) =>
      (row.maxCount !== null && row.maxCount > 0 && i >= row.maxCount) ||
      (oldest !== null && k.createdAt.getTime() < oldest),
  );
  for (const d of doomed) await deleteSnapshot(s, row.tenantId, d.id);
}

/** The Node replica's loop: runs due schedules every `tickMs`, one pass at a time. */
export function startScheduleRunner(s: Services, tickMs: number): () => void {
  let busy = false;
  const timer = setInterval(() => {
    if (busy) return;
    busy = true;
    runDueSchedules(s)
      .catch((e: unknown) => s.log("error", "schedule runner failed", { error: String(e) }))
      .finally(() => {
        busy = false;
      });
  }, tickMs);
  return () => clearInterval(timer);
}
