import { randomUUID } from "node:crypto";
import {
  type Command,
  type CommandError,
  HostCommandError,
  isErrorCode,
  type ObservedInstance,
  type Operation,
  PROTOCOL_VERSION,
  type Result,
  TimeoutError,
} from "@offshoot/shared";
import { and, asc, eq, inArray, ne, or, sql } from "drizzle-orm";
import { type Db, type Executor, type Tx, transaction } from "../db/client.ts";
import {
  events,
  type ForkFlowPayload,
  instances,
  type OperationRow,
  operations,
} from "../db/schema/index.ts";
import type { HostGateway } from "../gateway/host-gateway.ts";
import type { Log } from "../log.ts";
import { topics } from "./context.ts";
import type { Signals } from "./signals.ts";

export interface NewOperation {
  tenantId: string | null;
  hostId: string;
  instanceId: string | null;
  sourceInstanceId?: string | null;
  parentId?: string | null;
  step?: string | null;
  lock: "exclusive" | "shared" | "none";
  payload: Operation | ForkFlowPayload;
}

/** Whether the instance is locked against the wanted mode by a pending operation. */
export async function conflictingOperation(
  ex: Executor,
  instanceId: string,
  want: "exclusive" | "shared",
): Promise<OperationRow | undefined> {
  // An operation holds its `instance_id` exclusively and its `source_instance_id` in `lock` mode.
  const onSource =
    want === "exclusive"
      ? eq(operations.sourceInstanceId, instanceId)
      : and(eq(operations.sourceInstanceId, instanceId), eq(operations.lock, "exclusive"));
  const [row] = await ex
    .select()
    .from(operations)
    .where(
      and(
        eq(operations.status, "pending"),
        ne(operations.lock, "none"),
        or(eq(operations.instanceId, instanceId), onSource),
      ),
    )
    .limit(1);
  return row;
}

export function commandError(op: OperationRow): HostCommandError {
  const err: CommandError = op.error ?? { code: "internal_error", message: "operation failed" };
  if (isErrorCode(err.code)) return new HostCommandError(err.code, err.message);
  return new HostCommandError("internal_error", `${err.code}: ${err.message}`);
}

/**
 * Durable host commands: recorded in `operations` before they are sent, re-sent after every
 * reconnect until a result is recorded, and completed exactly once (the first result wins).
 */
export class Operations {
  constructor(
    private db: Db,
    private gateway: HostGateway,
    private signals: Signals,
    private log: Log,
  ) {}

  async insert(tx: Executor, n: NewOperation): Promise<OperationRow> {
    const [row] = await tx
      .insert(operations)
      .values({
        // Operation ids are internal; CUID2 (SHA-3 based) is kept for the ids users see.
        id: randomUUID(),
        tenantId: n.tenantId,
        hostId: n.hostId,
        instanceId: n.instanceId,
        sourceInstanceId: n.sourceInstanceId ?? null,
        parentId: n.parentId ?? null,
        step: n.step ?? null,
        lock: n.lock,
        kind: n.payload.kind,
        payload: n.payload,
      })
      .returning();
    if (!row) throw new Error("operation insert returned nothing");
    return row;
  }

  /** Sends a host command to its agent, wherever it is connected; otherwise it goes out on
   * the agent's next hello. */
  send(op: OperationRow): void {
    const sent = this.gateway.send(op.hostId, commandOf(op));
    this.log("debug", sent ? "command sent" : "command forwarded", { op: op.id, kind: op.kind });
  }

  async get(id: string): Promise<OperationRow | undefined> {
    const [row] = await this.db.select().from(operations).where(eq(operations.id, id));
    return row;
  }

  /** Waits for a pending operation to finish; undefined on timeout. */
  waitFor(id: string, timeoutMs: number): Promise<OperationRow | undefined> {
    return this.signals.until(topics.operation(id), timeoutMs, async () => {
      const op = this.recent.get(id) ?? (await this.get(id));
      return op && op.status !== "pending" ? op : undefined;
    });
  }

  /** Sends a recorded command and waits for its result; throws the host's error on failure. */
  async run(op: OperationRow, timeoutMs: number): Promise<OperationRow> {
    this.send(op);
    const done = await this.waitFor(op.id, timeoutMs);
    if (!done) {
      throw new TimeoutError(
        `host did not answer ${op.kind} within ${Math.round(timeoutMs / 1000)}s; operation ${op.id} is still pending and will complete when the host answers`,
      );
    }
    if (done.status === "failed") throw commandError(done);
    return done;
  }

  /** Records a host's result: exactly once, in one transaction with its effects. */
  async complete(hostId: string, result: Result): Promise<void> {
    const done = await transaction(this.db, async (tx) => {
      // One statement both claims and records the result: of two copies of one result (a
      // re-sent command answered twice), only the first finds the row still pending.
      const [op] = await tx
        .update(operations)
        .set({
          status: result.ok ? "succeeded" : "failed",
          observed: result.instances,
          error: result.ok ? null : result.error,
          completedAt: new Date(),
        })
        .where(
          and(
            eq(operations.id, result.command_id),
            eq(operations.hostId, hostId),
            eq(operations.status, "pending"),
          ),
        )
        .returning();
      if (!op) return undefined;
      // A replayed answer (a re-sent command answered from the journal) is older than the
      // inventory the agent's hello just reported, so its observations are not applied.
      const touched = result.replayed
        ? []
        : await applyObserved(tx, hostId, result.instances, `op:${op.kind}`);
      const removed = await this.applyEffects(tx, op, result.ok);
      return { op, changed: [...touched, ...removed] };
    });
    if (done === undefined) return;
    this.remember(done.op);
    this.signals.notify(topics.operation(result.command_id));
    for (const id of done.changed) this.signals.notify(topics.instance(id));
  }

  // Operations this process completed recently, so a waiter woken by the completion does not
  // read back what was just written. Bounded; a miss falls back to the database.
  private recent = new Map<string, OperationRow>();
  private remember(op: OperationRow) {
    this.recent.set(op.id, op);
    if (this.recent.size > 1000) {
      const oldest = this.recent.keys().next().value;
      if (oldest !== undefined) this.recent.delete(oldest);
    }
  }

  /** What a finished command means for rows beyond the observed states. */
  private async applyEffects(tx: Tx, op: OperationRow, ok: boolean): Promise<string[]> {
    const payload = op.payload as Operation;
    let drop: string | undefined;
    if (payload.kind === "delete" && ok) drop = payload.instance_id;
    // A failed create or fork was rolled back on the host: the row goes too.
    if (payload.kind === "create" && !ok) drop = payload.instance.id;
    if (payload.kind === "fork" && !ok) drop = payload.target.id;
    if (payload.kind === "fork" && op.parentId) {
      // Without from_running the host's fork is the flow's only step, so the flow ends with
      // it, atomically (see instances/fork.ts).
      await tx
        .update(operations)
        .set({ status: op.status, error: op.error, completedAt: op.completedAt })
        .where(
          and(
            eq(operations.id, op.parentId),
            eq(operations.status, "pending"),
            sql`(${operations.payload}->>'from_running')::boolean = false`,
          ),
        );
    }
    if (!drop) return [];
    const gone = await tx
      .delete(instances)
      .where(eq(instances.id, drop))
      .returning({ id: instances.id, tenantId: instances.tenantId });
    for (const g of gone) {
      await tx.insert(events).values({
        tenantId: g.tenantId,
        instanceId: g.id,
        hostId: op.hostId,
        type: "instance.deleted",
        data: { operation: op.id, reason: ok ? "deleted" : `${payload.kind} failed` },
      });
    }
    return gone.map((g) => g.id);
  }

  /** Everything still pending for a host, oldest first (re-sent after it connects). */
  pendingFor(hostId: string): Promise<OperationRow[]> {
    return this.db
      .select()
      .from(operations)
      .where(
        and(
          eq(operations.hostId, hostId),
          eq(operations.status, "pending"),
          ne(operations.kind, "fork_flow"),
        ),
      )
      .orderBy(asc(operations.createdAt));
  }

  async resendPending(hostId: string): Promise<number> {
    const pending = await this.pendingFor(hostId);
    for (const op of pending) this.send(op);
    return pending.length;
  }

  /** Ids of instances with a pending operation that may create them on the host. */
  async pendingTargets(ex: Executor, hostId: string): Promise<Set<string>> {
    const rows = await ex
      .select({ instanceId: operations.instanceId })
      .from(operations)
      .where(
        and(
          eq(operations.hostId, hostId),
          eq(operations.status, "pending"),
          inArray(operations.kind, ["create", "fork", "fork_flow"]),
        ),
      );
    return new Set(rows.flatMap((r) => (r.instanceId ? [r.instanceId] : [])));
  }
}

/**
 * Writes what a host observed onto the instances it owns. Returns the ids that changed.
 * The host is the source of truth for what runs: its report replaces our state, and clears
 * an `Unknown` left by a silence.
 */
/** The wire command for a recorded host operation. */
export function commandOf(op: OperationRow): Command {
  if (op.kind === "fork_flow") throw new Error("a fork flow is not a host command");
  return { v: PROTOCOL_VERSION, type: "command", id: op.id, op: op.payload as Operation };
}

export async function applyObserved(
  tx: Tx,
  hostId: string,
  observed: ObservedInstance[],
  cause: string,
): Promise<string[]> {
  // One UPDATE per instance, issued together (pipelined on the transaction's connection);
  // the previous state comes from each statement's snapshot in the same round trip.
  const rows = await Promise.all(
    observed.map(async (o) => {
      const before = tx
        .select({ id: instances.id, state: instances.state })
        .from(instances)
        .where(and(eq(instances.id, o.id), eq(instances.hostId, hostId)))
        .as("before");
      const [row] = await tx
        .update(instances)
        .set({
          state: o.state,
          stateError: o.state === "Unknown" ? (o.state_error ?? "host reported Unknown") : null,
          hasSnapshot: o.has_snapshot,
          ...(o.exit_code !== undefined && { exitCode: o.exit_code }),
          ...(o.exit_message !== undefined && { exitMessage: o.exit_message }),
          ...(o.started_at !== undefined && {
            startedAt: o.started_at ? new Date(o.started_at) : null,
          }),
          ...(o.stopped_at !== undefined && {
            stoppedAt: o.stopped_at ? new Date(o.stopped_at) : null,
          }),
          updatedAt: new Date(),
          version: sql`${instances.version} + 1`,
        })
        .from(before)
        .where(eq(instances.id, before.id))
        .returning({ tenantId: instances.tenantId, before: before.state });
      return row ? { ...row, o } : undefined;
    }),
  );
  const found = rows.filter((r) => r !== undefined);
  const moved = found.filter((r) => r.before !== r.o.state);
  if (moved.length > 0) {
    await tx.insert(events).values(
      moved.map((r) => ({
        tenantId: r.tenantId,
        instanceId: r.o.id,
        hostId,
        type: "instance.state",
        data: { from: r.before, to: r.o.state, cause },
      })),
    );
  }
  return found.map((r) => r.o.id);
}
