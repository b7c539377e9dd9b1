import { randomUUID } from "node:crypto";
import {
  type Command,
  type CommandError,
  type ForkFlowPayload,
  HostCommandError,
  isErrorCode,
  type ObservedInstance,
  type Operation,
  PROTOCOL_VERSION,
  type Result,
  TimeoutError,
} from "@offshoot/shared";
import { and, asc, eq, inArray, ne, type SQL, type SQLWrapper, sql } from "drizzle-orm";
import {
  type Db,
  type Executor,
  fromJsonb,
  insertRows,
  rowFromJson,
  selectRows,
  statement,
} from "../db/client.ts";
import { type InstanceRow, instances, type OperationRow, operations } from "../db/schema/index.ts";
import type { HostGateway } from "../gateway/host-gateway.ts";
import type { Log } from "../log.ts";
import { type Call, timeLeft, topics } from "./context.ts";
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

/**
 * The pending operation holding the instance most strongly, if any: one on the instance
 * itself, or one holding it exclusively as a source, comes before one sharing it as a source.
 * `instanceId` may be a subquery (see exactly() in instances/resolve.ts).
 */
export async function strongestHold(
  ex: Executor,
  instanceId: string | SQL,
): Promise<OperationRow | undefined> {
  const [op] = await selectRows(
    ex,
    operations,
    sql`select to_jsonb(o.*) as row from operations o
        where o.status = 'pending' and o.lock <> 'none'
          and (o.instance_id = ${instanceId} or o.source_instance_id = ${instanceId})
        order by (o.instance_id = ${instanceId} or o.lock = 'exclusive') desc
        limit 1`,
  );
  return op;
}

/** Whether `op` keeps the instance from being taken in the wanted mode: an operation holds its
 * `instance_id` exclusively and its `source_instance_id` in its `lock` mode. */
export function conflicts(
  op: OperationRow | undefined,
  instanceId: string,
  want: "exclusive" | "shared",
): op is OperationRow {
  return (
    op !== undefined &&
    (want === "exclusive" || op.instanceId === instanceId || op.lock === "exclusive")
  );
}

/** A new pending operation's row, not yet written (see insertOperations). Its `createdAt` is
 * this process's clock; the database's is recorded. */
export function newOperation(n: NewOperation): OperationRow {
  return {
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
    status: "pending",
    payload: n.payload,
    observed: null,
    error: null,
    createdAt: new Date(),
    completedAt: null,
  };
}

/**
 * The fork flows that are a single step, the host's fork, recorded with the flow: that step's
 * result ends the flow too, in the statement that records it (see complete). A flow from a
 * Running source (standby, fork, restore) is ended by its driver (instances/fork.ts).
 */
const FORK_ENDS_FLOW = { from_running: false } as const satisfies Partial<ForkFlowPayload>;
export const forkEndsFlow = (p: ForkFlowPayload): boolean =>
  Object.entries(FORK_ENDS_FLOW).every(([k, v]) => p[k as keyof ForkFlowPayload] === v);
/** The same rule in SQL, over a flow's payload column. */
export const forkEndsFlowSql = (payload: SQLWrapper): SQL =>
  sql`${payload} @> ${JSON.stringify(FORK_ENDS_FLOW)}::jsonb`;

/** The insert of new operations' rows. */
export const insertOperations = (rows: OperationRow[]): SQL =>
  insertRows(operations, rows, { now: ["created_at"] });

/** A failed operation's error as the API answers it. Rows recorded before agents' codes were
 * checked on receipt may hold a code outside the table: read as `internal_error`, like a new one. */
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
    const row = newOperation(n);
    await statement(tx, insertOperations([row]));
    return row;
  }

  /** Sends a host command to its agent, wherever it is connected; otherwise it goes out on
   * the agent's next hello (without `secrets`). */
  send(op: OperationRow, secrets?: Partial<Operation>): void {
    const command = commandOf(op);
    // Secrets (a pull's credentials) ride in this sending only: never in the recorded payload,
    // so a re-sent command goes without them.
    const sent = this.gateway.send(
      op.hostId,
      secrets ? { ...command, op: { ...command.op, ...secrets } as Operation } : command,
    );
    this.log("debug", sent ? "command sent" : "command forwarded", { op: op.id, kind: op.kind });
  }

  /** The operation if it has finished, read with its instance's row as it is now, which is
   * remembered (see writtenBy): a waiter on another replica than the one that recorded the
   * result reads both in one statement. */
  private async finished(id: string): Promise<OperationRow | undefined> {
    const [r] = await statement(
      this.db,
      sql`select to_jsonb(o.*) as op, (select to_jsonb(i.*) from instances i where i.id = o.instance_id) as row
          from operations o where o.id = ${id} and o.status <> 'pending'`,
    );
    if (!r) return undefined;
    const op = rowFromJson(operations, fromJsonb(r.op) as Record<string, unknown>);
    const row = fromJsonb(r.row) as Record<string, unknown> | null;
    this.remember(op, row ? [rowFromJson(instances, row)] : []);
    return op;
  }

  async get(id: string): Promise<OperationRow | undefined> {
    const [row] = await this.db.select().from(operations).where(eq(operations.id, id));
    return row;
  }

  /** Waits for a pending operation to finish; undefined on timeout. `justSent`: the caller
   * sent it after recording it, so no result can be there before a wake-up. */
  waitFor(
    id: string,
    timeoutMs: number,
    justSent = false,
    signal?: AbortSignal,
  ): Promise<OperationRow | undefined> {
    return this.signals.until(
      topics.operation(id),
      timeoutMs,
      async () => this.recent.get(id)?.op ?? (await this.finished(id)),
      { woken: justSent, signal },
    );
  }

  /** Sends a command just recorded and waits for its result until the call's deadline; throws
   * the host's error on failure. */
  async run(op: OperationRow, call: Call): Promise<OperationRow> {
    this.send(op);
    const done = await this.waitFor(op.id, timeLeft(call), true, call.signal);
    if (!done) {
      throw new TimeoutError(
        `host did not answer ${op.kind} in time; operation ${op.id} is still pending and will complete when the host answers`,
      );
    }
    if (done.status === "failed") throw commandError(done);
    return done;
  }

  /**
   * Records a host's result: exactly once, with its effects, in one statement (its own
   * transaction). The statement claims the operation — of two copies of one result (a re-sent
   * command answered twice), only the first finds it still pending — and, only if it did:
   * - ends the fork flow whose only step this is (forkEndsFlow);
   * - deletes the instance a successful delete, or a failed create or fork, leaves no trace of
   *   on the host (the host rolled a failed one back), with an event — only a row of this
   *   host: a host's answer never touches another host's instance;
   * - writes the observed states onto the host's other instances (observedWrites);
   * - writes an image_pull's outcome onto the image row it was for (if it still is: a newer
   *   pull of the name, or a delete, takes the row away from it), and the pulled digest onto
   *   the host's list;
   * - makes a captured snapshot ready (with its size) and removes a failed one; removes a
   *   deleted snapshot, and lists again one whose delete failed;
   * - records a snapshot's compression (its sizes, or its error), and issues it for a captured
   *   snapshot that asked for it (sent once recorded; re-sent on reconnect like any other).
   * A replayed answer (a re-sent command answered from the journal) is older than the
   * inventory the agent's hello just reported, so its observations are kept on the operation
   * but not applied.
   */
  async complete(hostId: string, result: Result): Promise<void> {
    const status = result.ok ? "succeeded" : "failed";
    const apply = result.replayed ? [] : result.instances;
    const pulled = (result.ok && result.image) || null;
    const captured = (result.ok && result.snapshot) || null;
    const [row] = await statement(
      this.db,
      sql`with c as (
        update operations set status = ${status}, observed = ${JSON.stringify(result.instances)}::jsonb,
          error = ${result.ok ? null : JSON.stringify(result.error)}::jsonb, completed_at = now()
        where id = ${result.command_id} and host_id = ${hostId} and status = 'pending'
        returning *
      ), f as (
        update operations f set status = c.status, error = c.error, completed_at = c.completed_at
        from c
        where c.kind = 'fork' and f.id = c.parent_id and f.status = 'pending'
          and ${forkEndsFlowSql(sql`f.payload`)}
        returning f.id
      ), x as (
        select case
          when c.kind = 'delete' and c.status = 'succeeded' then c.payload->>'instance_id'
          when c.kind = 'create' and c.status = 'failed' then c.payload->'instance'->>'id'
          when c.kind = 'fork' and c.status = 'failed' then c.payload->'target'->>'id'
        end as id
        from c
      ), d as (
        delete from instances where id = (select id from x) and host_id = ${hostId}
        returning id, tenant_id
      ), de as (
        insert into events (tenant_id, instance_id, host_id, type, data)
        select d.tenant_id, d.id, ${hostId}, 'instance.deleted', jsonb_build_object(
          'operation', c.id,
          'reason', case when c.status = 'succeeded' then 'deleted' else c.kind || ' failed' end)
        from d, c
      ), im as (
        update images set
          status = case when c.status = 'succeeded' then 'ready' else 'failed' end,
          error = case when c.status = 'failed' then c.error->>'message' end,
          digest = coalesce(p.j->>'digest', images.digest),
          platform = coalesce(p.j->>'platform', images.platform),
          size_bytes = coalesce((p.j->>'size_bytes')::bigint, images.size_bytes),
          entrypoint = case when p.j is null then images.entrypoint else p.j->'entrypoint' end,
          cmd = case when p.j is null then images.cmd else p.j->'cmd' end,
          env = coalesce(p.j->'env', images.env),
          working_dir = case when p.j is null then images.working_dir else p.j->>'working_dir' end,
          updated_at = now()
        from c, (select ${pulled === null ? null : JSON.stringify(pulled)}::jsonb as j) p
        where c.kind = 'image_pull' and images.operation_id = c.id
        returning images.id
      ), hd as (
        update hosts set image_digests = image_digests || jsonb_build_array(${pulled?.digest ?? null}::text)
        from c
        where c.kind = 'image_pull' and c.status = 'succeeded' and hosts.id = ${hostId}
          and ${pulled?.digest ?? null}::text is not null
          and not hosts.image_digests ? ${pulled?.digest ?? ""}::text
      ), sr as (
        update snapshots set status = 'ready',
          size_bytes = coalesce(${captured?.size_bytes ?? null}::bigint, snapshots.size_bytes)
        from c
        where snapshots.id = c.payload->>'snapshot_id' and snapshots.host_id = ${hostId}
          and ((c.kind = 'snapshot_create' and c.status = 'succeeded')
            or (c.kind = 'snapshot_delete' and c.status = 'failed'))
      ), sc as (
        insert into operations (id, tenant_id, host_id, instance_id, source_instance_id, lock, kind,
          status, payload, created_at)
        select gen_random_uuid()::text, s.tenant_id, s.host_id, null, s.id, 'shared',
          'snapshot_compress', 'pending',
          jsonb_build_object('kind', 'snapshot_compress', 'snapshot_id', s.id,
            'algorithm', s.compression->'algorithm', 'level', s.compression->'level'),
          now()
        from c join snapshots s on s.id = c.payload->>'snapshot_id'
        where c.kind = 'snapshot_create' and c.status = 'succeeded'
          and s.host_id = ${hostId} and s.compression is not null
        returning *
      ), sz as (
        update snapshots set
          compression_state = case when c.status = 'succeeded' then 'compressed' else 'error' end,
          compression_error = case when c.status = 'failed' then c.error->>'message' end,
          compressed_size_bytes = ${captured?.compressed_size_bytes ?? null}::bigint,
          uncompressed_size_bytes = ${captured?.uncompressed_size_bytes ?? null}::bigint,
          size_bytes = coalesce(${captured?.size_bytes ?? null}::bigint, snapshots.size_bytes)
        from c
        where c.kind = 'snapshot_compress' and snapshots.id = c.payload->>'snapshot_id'
          and snapshots.host_id = ${hostId}
      ), sd as (
        delete from snapshots using c
        where snapshots.id = c.payload->>'snapshot_id' and snapshots.host_id = ${hostId}
          and ((c.kind = 'snapshot_create' and c.status = 'failed')
            or (c.kind = 'snapshot_delete' and c.status = 'succeeded'))
      ), ${observedWrites(hostId, apply, sql`'op:' || (select kind from c)`, sql`exists (select 1 from c)`, sql`(select id from x)`)}
      select (select to_jsonb(c) from c) as op,
        coalesce((select jsonb_agg(to_jsonb(sc)) from sc), '[]'::jsonb) as next,
        coalesce((select jsonb_agg(to_jsonb(u)) from u), '[]'::jsonb) as updated,
        coalesce((select jsonb_agg(d.id) from d), '[]'::jsonb) as dropped`,
    );
    const op = fromJsonb(row?.op) as Record<string, unknown> | null;
    if (!op) return;
    const done = rowFromJson(operations, op);
    const updated = (fromJsonb(row?.updated) as Record<string, unknown>[]).map((r) =>
      rowFromJson(instances, r),
    );
    this.remember(done, updated);
    // What the result starts: a compression of the snapshot just captured.
    for (const r of fromJsonb(row?.next) as Record<string, unknown>[]) {
      this.send(rowFromJson(operations, r));
    }
    this.signals.notify(topics.operation(result.command_id));
    for (const r of updated) this.signals.notify(topics.instance(r.id));
    for (const t of new Set(updated.map((r) => r.tenantId))) this.signals.notify(topics.events(t));
    for (const id of fromJsonb(row?.dropped) as string[]) this.signals.notify(topics.instance(id));
  }

  // Operations this process completed recently, with the instance rows their results wrote,
  // so a waiter woken by the completion does not read back what was just written. Bounded; a
  // miss falls back to the database.
  private recent = new Map<string, { op: OperationRow; rows: InstanceRow[] }>();
  private remember(op: OperationRow, rows: InstanceRow[]) {
    this.recent.set(op.id, { op, rows });
    if (this.recent.size > 1000) {
      const oldest = this.recent.keys().next().value;
      if (oldest !== undefined) this.recent.delete(oldest);
    }
  }

  /** The row of instance `id` as the result of operation `opId` wrote it, if this process
   * recorded that result. */
  writtenBy(opId: string, id: string): InstanceRow | undefined {
    return this.recent.get(opId)?.rows.find((r) => r.id === id);
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

/** The wire command for a recorded host operation. */
export function commandOf(op: OperationRow): Command {
  if (op.kind === "fork_flow") throw new Error("a fork flow is not a host command");
  return { v: PROTOCOL_VERSION, type: "command", id: op.id, op: op.payload as Operation };
}

/** Writes what a host observed onto the instances it owns (see observedWrites), in one
 * statement. Returns the ids written. */
export async function applyObserved(
  ex: Executor,
  hostId: string,
  observed: ObservedInstance[],
  cause: string,
): Promise<string[]> {
  if (observed.length === 0) return [];
  const rows = await statement(
    ex,
    sql`with ${observedWrites(hostId, observed, sql`${cause}::text`, sql`true`, sql`null`)} select id from u`,
  );
  return rows.map((r) => String(r.id));
}

/**
 * The CTEs `o`, `b`, `u`, `e` of a statement that writes what a host observed onto the
 * instances it owns (except `skip`), if `when` holds: one UPDATE for all of them, whose
 * RETURNING (`u`, every column plus `before`) names the rows written, and a state event for
 * each one whose state changed. The host is the source of truth for what runs: its report
 * replaces our state, and clears an `Unknown` left by a silence. A field the report leaves
 * out is kept.
 */
function observedWrites(
  hostId: string,
  observed: ObservedInstance[],
  cause: SQL,
  when: SQL,
  skip: SQL,
): SQL {
  const keep = (col: string, cast: string) =>
    sql.raw(`${col} = case when b.j ? '${col}' then (b.j->>'${col}')::${cast} else i.${col} end`);
  return sql`o as (
    select value as j from jsonb_array_elements(${JSON.stringify(observed)}::jsonb) where ${when}
  ), b as (
    select i.id, i.state as before, o.j from instances i join o on i.id = o.j->>'id'
    where i.host_id = ${hostId} and i.id is distinct from ${skip}
  ), u as (
    update instances i set
      state = b.j->>'state',
      state_error = case when b.j->>'state' = 'Unknown'
        then coalesce(b.j->>'state_error', 'host reported Unknown') end,
      has_snapshot = (b.j->>'has_snapshot')::boolean,
      memory_charge_bytes = case when b.j->>'state' = i.state then i.memory_charge_bytes end,
      ${keep("exit_code", "int")}, ${keep("exit_message", "text")},
      ${keep("started_at", "timestamptz")}, ${keep("stopped_at", "timestamptz")},
      updated_at = now()
    from b where i.id = b.id
    returning i.*, b.before
  ), e as (
    insert into events (tenant_id, instance_id, host_id, type, data)
    select u.tenant_id, u.id, ${hostId}, 'instance.state',
      jsonb_build_object('from', u.before, 'to', u.state, 'cause', ${cause})
    from u where u.before is distinct from u.state
  )`;
}
