// Over 400 lines: the verb and the flow it starts (re-entrant steps, rollback) read as one.
import {
  ConflictError,
  ErrorCode,
  FORKABLE,
  ForkFlowPayload,
  type ForkInstanceRequest,
  type ForkTargetState,
  HostCommandError,
  type Instance,
  InvalidStateError,
  NotSupportedError,
  type Operation,
  TimeoutError,
} from "@offshoot/shared";
import { and, eq, sql } from "drizzle-orm";
import {
  type Executor,
  insertRows,
  issued,
  pgErrorCode,
  statement,
  type Tx,
  transaction,
  transactionEndingWith,
} from "../../db/client.ts";
import {
  hosts,
  type InstanceRow,
  instances,
  type OperationRow,
  operations,
  snapshots,
} from "../../db/schema/index.ts";
import { type Call, hostGrace, newCall, type Services, timeLeft, topics } from "../context.ts";
import { insertCreatedEvent } from "../events.ts";
import { newMac, noAddress } from "../network.ts";
import { commandError, forkEndsFlow, insertOperations, newOperation } from "../operations.ts";
import { admitLocked, overcommitOf } from "../placement.ts";
import { nameConflict, nameTaken } from "./errors.ts";
import { newInstanceId } from "./ids.ts";
import { assertIdle, lockChecked } from "./lifecycle.ts";
import { present } from "./present.ts";
import { getById, rowAfter } from "./resolve.ts";
import { specOf } from "./spec.ts";

/**
 * POST /instances/{id}/fork. The rules, in the order they are checked:
 * - a writable volume cannot be shared by two instances: 409 naming it;
 * - the source must be Stopped or Standby, or Running with `from_running` (else 409);
 * - `target_state` defaults to the source's state at fork time;
 * - the fork gets a new id, its name, a new MAC and IP, `created_at` now, and inherits image,
 *   env, vcpus, sizes, disk and network limits, tags and read-only volumes;
 * - it is placed on the source's host, where the copy-on-write data is.
 * The work itself is a durable flow (see driveFork) so a control-plane restart resumes it.
 */
export async function forkInstance(
  s: Services,
  tenantId: string,
  ref: string,
  req: ForkInstanceRequest,
  call: Call = newCall(s),
): Promise<Instance> {
  const { flow, children } = await transactionEndingWith(s.db, async (tx) => {
    const {
      row: src,
      held,
      host: lockedHost,
      address,
      used,
      nameTaken: taken,
    } = await lockChecked(tx, hostGrace(s), tenantId, ref, {
      address: true,
      name: req.name,
      // A fork to Running needs room (target_state defaults to a Running source's state).
      ...((req.target_state ?? (req.from_running ? "Running" : undefined)) === "Running" && {
        usage: "all",
      }),
    });
    if (taken) throw nameTaken(req.name);
    const writable = src.volumes.find((v) => !v.readonly);
    if (writable) {
      throw new ConflictError(
        `cannot fork ${src.name}: volume ${writable.volume_id} is attached writable at ${writable.mount_path}, and a writable volume cannot be shared by two instances; attach it read-only (or with an overlay) to fork`,
      );
    }
    if (!FORKABLE.includes(src.state)) {
      throw new InvalidStateError(
        `cannot fork ${src.name}: it is ${src.state}; fork needs Stopped, Standby, or Running with from_running=true`,
      );
    }
    if (src.state === "Running" && !req.from_running) {
      throw new InvalidStateError(
        `cannot fork ${src.name}: it is Running; pass from_running=true to put it into standby, fork it and restore it`,
      );
    }
    const fromRunning = src.state === "Running";
    const targetState = req.target_state ?? (src.state as ForkTargetState);
    const need = { vcpus: src.vcpus, memoryBytes: src.memoryBytes + src.hotplugBytes };
    assertIdle(src, fromRunning ? "exclusive" : "shared", held);
    const host = await admitLocked(
      tx,
      lockedHost,
      src.hostId,
      targetState === "Running" ? need : undefined,
      overcommitOf(s.env),
      undefined,
      used,
    );
    const ip = src.networkEnabled ? address : null;
    if (src.networkEnabled && !ip) throw noAddress(host.name);
    const caps = host.capabilities;
    const via = src.state === "Stopped" ? "fork_from_stopped" : "fork_from_standby";
    if (!caps?.[via] || ((fromRunning || targetState === "Standby") && !caps.standby)) {
      throw new NotSupportedError(
        `host ${host.name} (${host.driver}) cannot fork a ${src.state} instance to ${targetState}`,
      );
    }
    const target = forkTarget(src, req.name, ip);
    return recordForkFlow(
      tx,
      target,
      {
        kind: "fork_flow",
        source_id: src.id,
        target_id: target.id,
        from_running: fromRunning,
        target_state: targetState,
      },
      fromRunning ? "exclusive" : "shared",
      host.subnet,
    );
  }).catch((e: unknown) => nameConflict(e, req.name));
  return forkResult(s, tenantId, flow, children, call);
}

/** A fork's row: its source's settings (image, env, sizes, limits, tags, volumes) with a new id,
 * its name, a new MAC and the address given, Created now. */
export function forkTarget(src: InstanceRow, name: string, ip: string | null): InstanceRow {
  const now = new Date();
  return {
    ...src,
    id: newInstanceId(),
    name,
    state: "Created",
    stateError: null,
    ip,
    mac: src.networkEnabled ? newMac() : null,
    hasSnapshot: false,
    memoryChargeBytes: null,
    exitCode: null,
    exitMessage: null,
    forkedFrom: src.id,
    createdAt: now,
    startedAt: null,
    stoppedAt: null,
    updatedAt: now,
  };
}

/** Records a fork flow holding its source (`payload.source_id`) in `lock` mode, with its
 * target's row and — for a flow that is the host's fork alone — that step. The rows go out in
 * one statement, with the COMMIT; a name conflict fails it. */
export function recordForkFlow(
  tx: Tx,
  target: InstanceRow,
  payload: ForkFlowPayload,
  lock: "exclusive" | "shared",
  subnet: string,
) {
  const owned = { tenantId: target.tenantId, hostId: target.hostId, instanceId: target.id };
  const flow = newOperation({ ...owned, sourceInstanceId: payload.source_id, lock, payload });
  const children = forkEndsFlow(payload)
    ? [
        newOperation({
          ...owned,
          parentId: flow.id,
          step: "fork",
          lock: "none",
          payload: forkCommand(payload, target, subnet),
        }),
      ]
    : [];
  const written = issued(
    statement(
      tx,
      sql`with i as (${insertRows(instances, [target])}), e as (${insertCreatedEvent(target)}) ${insertOperations([flow, ...children])}`,
    ),
  );
  return { value: { flow, children }, last: [written] };
}

/** Waits for a fork flow recorded by this request and answers its fork. */
export async function forkResult(
  s: Services,
  tenantId: string,
  flow: OperationRow,
  children: OperationRow[],
  call: Call,
): Promise<Instance> {
  await awaitFlow(s, flow, children, call, "fork");
  // Without from_running the host's fork was the last write; otherwise read it back.
  const target = flow.instanceId ?? "";
  const last = children[0];
  return present(
    await (last ? rowAfter(s, tenantId, last.id, target) : getById(s.db, tenantId, target)),
  );
}

/** Drives a flow this request recorded until it ends, throwing its error. The flow goes on
 * without this request: it stops waiting at its deadline or when its client goes away. */
export async function awaitFlow(
  s: Services,
  flow: OperationRow,
  children: OperationRow[],
  call: Call,
  what: string,
): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  let stopWaiting = () => {};
  const timeout = new Promise<never>((_, reject) => {
    stopWaiting = () =>
      reject(
        new TimeoutError(
          `${what} still in progress (operation ${flow.id}); it will finish or roll back when the host answers`,
        ),
      );
    timer = setTimeout(stopWaiting, timeLeft(call));
    call.signal?.addEventListener("abort", stopWaiting);
  });
  try {
    const outcome = await Promise.race([driveFork(s, flow.id, { flow, children }), timeout]);
    if (outcome.error) throw outcome.error;
  } finally {
    clearTimeout(timer);
    call.signal?.removeEventListener("abort", stopWaiting);
  }
}

interface ForkOutcome {
  error?: HostCommandError;
}

/** Flows being driven, per Services: one per process on Node; on Workers one per request or cron
 * run, whose promises die with it — another run must not mistake them for live. */
const drivingBy = new WeakMap<Services, Map<string, Promise<ForkOutcome>>>();
const drivingOf = (s: Services) => {
  let m = drivingBy.get(s);
  if (!m) {
    m = new Map();
    drivingBy.set(s, m);
  }
  return m;
};

/**
 * Drives a fork flow to its end. Re-entrant: every step is an operations row (one per kind,
 * enforced by a unique index), so after a restart the flow continues from what is recorded.
 * Without from_running the flow is one step, the host's fork, recorded with the flow and
 * completing it. With from_running: standby source → fork → restore source. The source is
 * restored even when the fork failed; if the restore fails, the fork is deleted again, so the
 * call either succeeds as a whole or leaves no fork behind, and every error is reported.
 */
export function driveFork(
  s: Services,
  flowId: string,
  known?: { flow: OperationRow; children: OperationRow[] },
): Promise<ForkOutcome> {
  const driving = drivingOf(s);
  let p = driving.get(flowId);
  if (!p) {
    p = runFlow(s, flowId, known).finally(() => driving.delete(flowId));
    driving.set(flowId, p);
  }
  return p;
}

/** The flows these services are driving now (a Worker's cron must wait for them). */
export const drivingFlows = (s: Services): Promise<unknown>[] => [...drivingOf(s).values()];

/** Flows left pending by a previous process (or a failed request): drive them to the end. */
export async function resumeForks(s: Services): Promise<number> {
  const pending = await s.db
    .select({ id: operations.id })
    .from(operations)
    .where(and(eq(operations.kind, "fork_flow"), eq(operations.status, "pending")));
  for (const { id } of pending) {
    if (!drivingOf(s).has(id)) {
      driveFork(s, id).catch((e: unknown) =>
        s.log("error", "fork flow failed to resume", { flow: id, error: String(e) }),
      );
    }
  }
  return pending.length;
}

// A step waits as long as it takes: a host that is away answers when it returns.
const STEP_WAIT_MS = 24 * 3600_000;
const RESTORE_ATTEMPTS = 3;

export function forkCommand(p: ForkFlowPayload, target: InstanceRow, subnet: string): Operation {
  return {
    kind: "fork",
    source_id: p.source_id,
    target: specOf(target, subnet),
    target_state: p.target_state,
    ...(p.from_snapshot && { from_snapshot: true }),
  };
}

async function runFlow(
  s: Services,
  flowId: string,
  known?: { flow: OperationRow; children: OperationRow[] },
): Promise<ForkOutcome> {
  const flow = known?.flow ?? (await s.ops.get(flowId));
  if (!flow) throw new Error(`fork flow ${flowId} not found`);
  const p = ForkFlowPayload.parse(flow.payload);
  if (flow.status !== "pending") {
    return flow.status === "failed" ? { error: commandError(flow) } : {};
  }

  const findStep = async (name: string) => {
    const mine = known?.children.find((c) => c.step === name);
    if (mine) return mine;
    const [row] = await s.db
      .select()
      .from(operations)
      .where(and(eq(operations.parentId, flowId), eq(operations.step, name)));
    return row;
  };
  /** Runs step `name` once: records it (unless a previous driver did), sends it, awaits it. */
  const step = async (name: string, make: () => Promise<Operation>): Promise<OperationRow> => {
    let child = await findStep(name);
    // Recorded by this call: its result cannot be in before it is sent.
    let justSent = child !== undefined && known?.children.includes(child) === true;
    if (!child) {
      justSent = true;
      const op = await make();
      child = await s.ops
        .insert(s.db, {
          tenantId: flow.tenantId,
          hostId: flow.hostId,
          instanceId: "instance_id" in op ? op.instance_id : flow.instanceId,
          parentId: flowId,
          step: name,
          lock: "none",
          payload: op,
        })
        .catch(async (e: unknown) => {
          if (pgErrorCode(e).code !== "23505") throw e;
          const raced = await findStep(name);
          if (!raced) throw e;
          justSent = false;
          return raced;
        });
    }
    if (child.status !== "pending") return child;
    s.ops.send(child);
    for (;;) {
      const done = await s.ops.waitFor(child.id, STEP_WAIT_MS, justSent);
      if (done) return done;
      justSent = false;
    }
  };
  /** An instance's state as the host reported it after a step, else as recorded. */
  const stateAfter = async (op: OperationRow, id: string) => {
    const seen = op.observed?.find((o) => o.id === id)?.state;
    if (seen) return seen;
    const [row] = await s.db
      .select({ state: instances.state })
      .from(instances)
      .where(eq(instances.id, id));
    return row?.state;
  };
  /** Restores an instance as step `name`: a restore interrupted by an agent restart is tried
   * again (`name#2`, …), and one that failed but left the instance Running succeeded. Returns
   * the error if it did not end Running. */
  const restoreStep = async (name: string, id: string) => {
    let err: HostCommandError | undefined;
    for (let attempt = 1; attempt <= RESTORE_ATTEMPTS; attempt++) {
      const rs = await step(attempt === 1 ? name : `${name}#${attempt}`, async () => ({
        kind: "restore",
        instance_id: id,
      }));
      if (rs.status === "succeeded" || (await stateAfter(rs, id)) === "Running") return undefined;
      err = commandError(rs);
      if (err.code !== ErrorCode.enum.interrupted) break;
    }
    return err;
  };
  /** Deletes the fork again; false if even that failed (its row is then kept, see below). */
  const rollBackFork = async () =>
    (
      await step("delete", async () =>
        p.snapshot
          ? { kind: "snapshot_delete", snapshot_id: p.target_id }
          : { kind: "delete", instance_id: p.target_id },
      )
    ).status !== "failed";

  if (forkEndsFlow(p)) {
    // The fork is the only step; its completion also completed the flow (operations.ts).
    const fk = await step("fork", async () => {
      throw new Error(`fork flow ${flowId} has no recorded fork step`);
    });
    return fk.status === "failed" ? { error: commandError(fk) } : {};
  }

  // from_running: standby the source → fork → restore the source (even if the fork failed) →
  // start the fork. A fork meant to run is made in Standby first and started only after the
  // source runs again: the source's pause covers the snapshot and the file clones, not the
  // fork's own restore.
  const startLater = p.target_state === "Running" && !p.snapshot;
  let failure: HostCommandError | undefined;
  let forked = false;
  const sb = await step("standby", async () => ({ kind: "standby", instance_id: p.source_id }));
  if (sb.status === "failed") {
    failure = prefixed(commandError(sb), "putting the source into standby failed: ");
  } else {
    const fk = await step("fork", async () => {
      if (p.snapshot) {
        return {
          kind: "snapshot_create",
          instance_id: p.source_id,
          snapshot_id: p.target_id,
          snapshot_kind: "Standby",
        };
      }
      // The flow holds the target exclusively, so its row is there until the flow ends.
      const [found] = await s.db
        .select({ target: instances, subnet: hosts.subnet })
        .from(instances)
        .innerJoin(hosts, eq(hosts.id, instances.hostId))
        .where(eq(instances.id, p.target_id));
      if (!found) throw new Error(`fork target ${p.target_id} vanished during its flow`);
      const { target, subnet } = found;
      return forkCommand(startLater ? { ...p, target_state: "Standby" } : p, target, subnet);
    });
    if (fk.status === "failed") failure = commandError(fk);
    else forked = true;
  }
  // Restore whenever the source is in Standby — also after a standby that failed late (an
  // agent killed after the snapshot reports it Standby).
  let rollbackFailed = false;
  if ((await stateAfter(sb, p.source_id)) === "Standby") {
    const restoreErr = await restoreStep("restore", p.source_id);
    if (restoreErr) {
      failure = failure
        ? prefixed(failure, "", `; restoring the source failed too: ${restoreErr.message}`)
        : prefixed(restoreErr, "restoring the source failed, so the fork was rolled back: ");
      if (forked) rollbackFailed = !(await rollBackFork());
    }
  }
  if (forked && !failure && startLater) {
    const startErr = await restoreStep("start-fork", p.target_id);
    if (startErr) {
      // The fork cannot reach its target state: it is rolled back, the source runs on.
      failure = prefixed(startErr, "the fork could not be started, so it was rolled back: ");
      rollbackFailed = !(await rollBackFork());
    }
  }

  const finish = (ex: Executor) =>
    ex
      .update(operations)
      .set({
        status: failure ? "failed" : "succeeded",
        error: failure ? { code: failure.code, message: failure.message } : null,
        completedAt: new Date(),
      })
      .where(and(eq(operations.id, flowId), eq(operations.status, "pending")));
  if (!failure) {
    await finish(s.db);
    s.signals.notify(topics.instance(p.target_id));
    return {};
  }
  const err = failure;
  await transaction(s.db, async (tx) => {
    await finish(tx);
    if (p.snapshot) {
      // A snapshot the host could not delete again stays listed, to be deleted.
      if (!rollbackFailed) await tx.delete(snapshots).where(eq(snapshots.id, p.target_id));
    } else if (rollbackFailed) {
      // The host still has the fork: keep its row (and its address) so it can be deleted.
      await tx
        .update(instances)
        .set({
          state: "Unknown",
          stateError: `this fork could not be rolled back after: ${err.message}; delete it`,
        })
        .where(eq(instances.id, p.target_id));
    } else {
      await tx.delete(instances).where(eq(instances.id, p.target_id));
    }
  });
  s.signals.notify(topics.instance(p.target_id));
  return { error: failure };
}

function prefixed(err: HostCommandError, before: string, after = ""): HostCommandError {
  return new HostCommandError(err.code, `${before}${err.message}${after}`);
}
