// Recording a host's result (Operations.complete, one statement with its effects), on both
// databases the control plane runs on: a Postgres server and embedded PGlite.
import { randomUUID } from "node:crypto";
import type { ForkFlowPayload, ObservedInstance, Operation, Result } from "@offshoot/shared";
import { asc, eq } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  databaseBackends,
  instanceValues,
  registerHost,
  seedTenant,
} from "../../../test/harness.ts";
import type { Db } from "../db/client.ts";
import { events, type InstanceRow, instances, operations } from "../db/schema/index.ts";
import type { HostGateway } from "../gateway/host-gateway.ts";
import { silentLog } from "../log.ts";
import { Operations } from "./operations.ts";
import { Signals } from "./signals.ts";

const quiet: HostGateway = {
  send: () => true,
  reachesDirectly: () => true,
  openLogs: async () => undefined,
  openStream: async () => undefined,
};

describe.each(databaseBackends)("recording a result (%s)", (_name, open) => {
  let db: Db;
  let close: () => Promise<void>;
  let ops: Operations;
  let tenantId: string;
  let hostId: string;
  let n = 0;

  beforeAll(async () => {
    ({ db, close } = await open());
    tenantId = (await seedTenant(db)).tenantId;
    hostId = (await registerHost(db)).hostId;
    ops = new Operations(db, quiet, new Signals(), silentLog);
  });
  afterAll(() => close());

  const instance = async (state: InstanceRow["state"], extra: Partial<InstanceRow> = {}) => {
    const id = `i${++n}${randomUUID().slice(0, 8)}`;
    const [row] = await db
      .insert(instances)
      .values(instanceValues(tenantId, hostId, id, { state, ...extra }))
      .returning();
    if (!row) throw new Error("insert returned nothing");
    return row;
  };
  const pending = async (
    payload: Operation | ForkFlowPayload,
    extra: { instanceId?: string; parentId?: string; step?: string } = {},
  ) => {
    const id = randomUUID();
    await db.insert(operations).values({
      id,
      tenantId,
      hostId,
      instanceId: extra.instanceId ?? null,
      parentId: extra.parentId ?? null,
      step: extra.step ?? null,
      lock: "none",
      kind: payload.kind,
      payload,
    });
    return id;
  };
  /** A Standby source, a fork of it being made, the fork's flow and the flow's host command. */
  const forkInFlight = async (fromRunning: boolean) => {
    const src = await instance("Standby", { hasSnapshot: true });
    const target = await instance("Created", { forkedFrom: src.id });
    const flow = await pending(
      {
        kind: "fork_flow",
        source_id: src.id,
        target_id: target.id,
        from_running: fromRunning,
        target_state: "Standby",
      },
      { instanceId: target.id },
    );
    const fork = await pending(
      {
        kind: "fork",
        source_id: src.id,
        target: { id: target.id } as never,
        target_state: "Standby",
      },
      { instanceId: target.id, parentId: flow, step: "fork" },
    );
    return { src, target, flow, fork };
  };
  const result = (
    commandId: string,
    instances: ObservedInstance[],
    more: Partial<Result> = {},
  ): Result =>
    ({ v: 1, type: "result", command_id: commandId, ok: true, instances, ...more }) as Result;
  const row = async (id: string) =>
    (await db.select().from(instances).where(eq(instances.id, id)))[0];
  const op = async (id: string) =>
    (await db.select().from(operations).where(eq(operations.id, id)))[0];
  const eventsOf = (id: string) =>
    db
      .select({ type: events.type, data: events.data })
      .from(events)
      .where(eq(events.instanceId, id))
      .orderBy(asc(events.id));

  it("applies a result once; a second copy of it changes nothing", async () => {
    const inst = await instance("Stopped", { exitCode: 3, exitMessage: "exit status 3" });
    const start = await pending({ kind: "start", instance_id: inst.id }, { instanceId: inst.id });
    const started = "2026-11-28T10:00:00.000Z";
    await ops.complete(
      hostId,
      result(start, [{ id: inst.id, state: "Running", has_snapshot: false, started_at: started }]),
    );
    const after = await row(inst.id);
    expect(after).toMatchObject({ state: "Running", exitCode: 3 });
    expect(after?.startedAt?.toISOString()).toBe(started);
    expect(await op(start)).toMatchObject({ status: "succeeded", error: null });
    expect((await op(start))?.completedAt).toBeInstanceOf(Date);
    // What this process wrote is what the database holds.
    expect(ops.writtenBy(start, inst.id)).toEqual(after);
    expect(await eventsOf(inst.id)).toEqual([
      { type: "instance.state", data: { from: "Stopped", to: "Running", cause: "op:start" } },
    ]);

    await ops.complete(
      hostId,
      result(start, [{ id: inst.id, state: "Stopped", has_snapshot: false }]),
    );
    expect(await row(inst.id)).toEqual(after);
    expect(await eventsOf(inst.id)).toHaveLength(1);
  });

  it("clears a field the host reports as null and explains an Unknown state", async () => {
    const inst = await instance("Running", { exitCode: 1, exitMessage: "exit status 1" });
    const stop = await pending({ kind: "stop", instance_id: inst.id }, { instanceId: inst.id });
    await ops.complete(
      hostId,
      result(stop, [
        { id: inst.id, state: "Unknown", has_snapshot: false, exit_code: null, exit_message: null },
      ]),
    );
    expect(await row(inst.id)).toMatchObject({
      state: "Unknown",
      stateError: "host reported Unknown",
      exitCode: null,
      exitMessage: null,
    });
  });

  it("records a replayed answer without applying what it observed", async () => {
    const inst = await instance("Running");
    const stop = await pending({ kind: "stop", instance_id: inst.id }, { instanceId: inst.id });
    const observed = [{ id: inst.id, state: "Stopped" as const, has_snapshot: false }];
    await ops.complete(hostId, result(stop, observed, { replayed: true }));
    expect(await op(stop)).toMatchObject({ status: "succeeded", observed });
    expect((await row(inst.id))?.state).toBe("Running");
  });

  it("never applies another host's result", async () => {
    const inst = await instance("Running");
    const stop = await pending({ kind: "stop", instance_id: inst.id }, { instanceId: inst.id });
    const other = (await registerHost(db)).hostId;
    await ops.complete(
      other,
      result(stop, [{ id: inst.id, state: "Stopped", has_snapshot: false }]),
    );
    expect((await op(stop))?.status).toBe("pending");
    expect((await row(inst.id))?.state).toBe("Running");
  });

  it("a failed fork takes its target row with it and fails its flow", async () => {
    const { src, target, flow, fork } = await forkInFlight(false);
    const error = { code: "internal_error" as const, message: "disk full" };
    await ops.complete(
      hostId,
      result(fork, [{ id: src.id, state: "Standby", has_snapshot: true }], { ok: false, error }),
    );
    expect(await row(target.id)).toBeUndefined();
    expect(await eventsOf(target.id)).toEqual([
      { type: "instance.deleted", data: { operation: fork, reason: "fork failed" } },
    ]);
    expect(await op(fork)).toMatchObject({ status: "failed", error });
    expect(await op(flow)).toMatchObject({ status: "failed", error });
    // The source's report changed nothing: no event.
    expect(await eventsOf(src.id)).toEqual([]);
  });

  it("a successful fork ends its flow; a from_running flow is left to its driver", async () => {
    for (const fromRunning of [false, true]) {
      const { src, target, flow, fork } = await forkInFlight(fromRunning);
      await ops.complete(
        hostId,
        result(fork, [
          { id: src.id, state: "Standby", has_snapshot: true },
          { id: target.id, state: "Standby", has_snapshot: true },
        ]),
      );
      expect((await op(flow))?.status).toBe(fromRunning ? "pending" : "succeeded");
      expect((await row(target.id))?.state).toBe("Standby");
    }
  });

  it("a successful delete removes the row, with an event", async () => {
    const inst = await instance("Stopped");
    const del = await pending({ kind: "delete", instance_id: inst.id }, { instanceId: inst.id });
    await ops.complete(hostId, result(del, []));
    expect(await row(inst.id)).toBeUndefined();
    expect(await eventsOf(inst.id)).toEqual([
      { type: "instance.deleted", data: { operation: del, reason: "deleted" } },
    ]);
  });
});
