// Hosts are trusted to run guests, not with the rest of the fleet: a host's messages apply to
// its own instances only, and what a hello may claim is bounded. A hand-driven agent with a
// valid token of a second host plays the hostile host.
import { existsSync } from "node:fs";
import { AGENT_LIMITS, type Instance } from "@offshoot/shared";
import { and, count, eq, isNull } from "drizzle-orm";
import { beforeAll, describe, expect, it } from "vitest";
import {
  hosts,
  instances,
  operations,
  snapshots,
} from "../../control-plane/src/db/schema/index.ts";
import { MAX_ORPHAN_DELETES } from "../../control-plane/src/services/agent-messages/hello.ts";
import { agentPaths } from "../../host-agent/src/paths.ts";
import { fakeAgent, isCommand, isWelcome } from "../fake-agent.ts";
import { api, hostOnline, registerHost, waitFor } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

const made = (n: number, prefix: string) =>
  Array.from({ length: n }, (_, i) => ({
    id: `${prefix}${i}`,
    state: "Running",
    has_snapshot: false,
  }));

describe("a host touches only its own instances", () => {
  let stack: Stack;
  let call: ReturnType<typeof api>;
  let victim: Instance;

  beforeAll(async () => {
    // A long grace period: nothing here may be rescued (or hidden) by the silence sweep.
    stack = await startStack({
      cpEnv: { HOST_GRACE_MS: "60000" },
      agents: [{ SIM_LATENCY_MS: JSON.stringify({ stop: 1500 }) }],
    });
    call = api(stack.cp.url, stack.apiKey);
    const r = await call("POST", "/instances", { name: "victim", image: "alpine", vcpus: 1 });
    expect(r.status, JSON.stringify(r.body)).toBe(201);
    victim = r.body as Instance;
  });

  const opStatus = async (id: string) =>
    (await stack.db.select().from(operations).where(eq(operations.id, id)))[0]?.status;

  it("another host's hello, events and results change nothing of another host's instance", async () => {
    const owner = stack.agents[0];
    if (!owner) throw new Error("no agent");
    const b = await registerHost(stack.db);
    const fake = await fakeAgent(stack.cp.url, b.token);
    // B claims A's instance: to B it is an orphan of its own, to be deleted on B.
    fake.hello({ inventory: [{ id: victim.id, state: "Stopped", has_snapshot: false }] });
    const orphanDelete = await fake.next(isCommand);
    expect(orphanDelete.op).toEqual({ kind: "delete", instance_id: victim.id });

    // A stop on A, slow enough to be forged at.
    const stopping = call("POST", `/instances/${victim.id}/stop`);
    const [stop] = await waitFor(async () => {
      const rows = await stack.db
        .select()
        .from(operations)
        .where(and(eq(operations.instanceId, victim.id), eq(operations.status, "pending")));
      return rows.length > 0 ? rows : undefined;
    });
    if (!stop) throw new Error("no pending stop");
    fake.send({
      v: 1,
      type: "event",
      instance: { id: victim.id, state: "Unknown", has_snapshot: false, state_error: "forged" },
    });
    fake.send({
      v: 1,
      type: "result",
      command_id: stop.id,
      ok: false,
      error: { code: "internal_error", message: "forged failure" },
      instances: [{ id: victim.id, state: "Unknown", has_snapshot: false }],
    });
    // Answered last: once it is recorded, everything B sent before it has been handled.
    fake.send({
      v: 1,
      type: "result",
      command_id: orphanDelete.id,
      ok: true,
      instances: [],
    });
    await waitFor(async () => (await opStatus(orphanDelete.id)) === "succeeded", {
      what: "B's own delete to be recorded",
    });

    const [row] = await stack.db.select().from(instances).where(eq(instances.id, victim.id));
    expect(row).toMatchObject({ hostId: stack.hostIds[0], state: "Running", stateError: null });
    expect(await opStatus(stop.id)).toBe("pending");
    // A's own answer is the one that counts.
    const stopped = await stopping;
    expect(stopped.status, JSON.stringify(stopped.body)).toBe(200);
    expect(stopped.body).toMatchObject({ id: victim.id, state: "Stopped" });
    expect(await opStatus(stop.id)).toBe("succeeded");

    // A says hello again: its instance is still its own, and A is never told to delete it.
    await owner.restart();
    await hostOnline(stack.db, stack.hostIds[0] ?? "");
    const after = await call("GET", `/instances/${victim.id}`);
    expect(after.status).toBe(200);
    expect(after.body).toMatchObject({ state: "Stopped" });
    expect(owner.execLog().filter((l) => l.kind === "delete")).toEqual([]);
    fake.close();
  });

  it("bounds what a hello may claim: sizes, capacity, and the deletes its inventory causes", async () => {
    const c = await registerHost(stack.db);
    const hostRow = async () =>
      (await stack.db.select().from(hosts).where(eq(hosts.id, c.hostId)))[0];

    // Over the frame limit: the socket is closed before the message is taken whole.
    const huge = await fakeAgent(stack.cp.url, c.token);
    huge.hello({ agent_version: "x".repeat(AGENT_LIMITS.frameBytes + 1) });
    expect((await huge.closed).code).toBe(1009);
    // Within the frame, over a field's bound: refused with the reason.
    const long = await fakeAgent(stack.cp.url, c.token);
    long.hello({ agent_version: "x".repeat(100_000) });
    const refused = await long.closed;
    expect(refused.code).toBe(4400);
    expect(refused.reason).toMatch(/agent_version/);
    const greedy = await fakeAgent(stack.cp.url, c.token);
    greedy.hello({ capacity: { vcpus: 1e9, memory_bytes: 2 ** 60 } });
    expect(await greedy.closed).toMatchObject({ code: 4400 });
    expect(await hostRow()).toMatchObject({ status: "offline", agentVersion: null, vcpus: 0 });

    // Made-up ids: deletes are bounded per host and never made twice.
    const pendingDeletes = async () =>
      (
        await stack.db
          .select({ n: count() })
          .from(operations)
          .where(
            and(
              eq(operations.hostId, c.hostId),
              eq(operations.kind, "delete"),
              isNull(operations.instanceId),
            ),
          )
      )[0]?.n ?? 0;
    for (let round = 0; round < 2; round++) {
      const agent = await fakeAgent(stack.cp.url, c.token);
      agent.hello({ inventory: made(5_000, "madeup") });
      await agent.next(isCommand);
      await waitFor(async () => (await pendingDeletes()) === MAX_ORPHAN_DELETES, {
        what: `${MAX_ORPHAN_DELETES} pending deletes`,
      });
      agent.close();
      await agent.closed;
    }
    expect(await pendingDeletes()).toBe(MAX_ORPHAN_DELETES);
  });

  it("removes the snapshots a host holds that no row of its own names, and only those", async () => {
    const owner = stack.agents[0];
    if (!owner) throw new Error("no agent");
    const snapDir = (id: string) => agentPaths(owner.dataDir).simSnapshots.instanceDir(id);
    const take = async () => {
      const r = await call("POST", `/instances/${victim.id}/snapshots`, { kind: "Stopped" });
      expect(r.status, JSON.stringify(r.body)).toBe(201);
      return (r.body as { id: string }).id;
    };
    await call("POST", `/instances/${victim.id}/stop`);
    const [kept, lost] = [await take(), await take()];
    expect(existsSync(snapDir(lost))).toBe(true);

    // Another host claiming A's snapshot is told to delete its own copy, nothing of A's.
    const b = await registerHost(stack.db);
    const fake = await fakeAgent(stack.cp.url, b.token);
    fake.hello({ snapshots: [kept] });
    expect((await fake.next(isCommand)).op).toEqual({ kind: "snapshot_delete", snapshot_id: kept });
    fake.close();

    // A snapshot whose row is gone (as a deleted tenant's rows go) is removed from its host on
    // the host's next hello; the one with a row stays and still forks.
    await stack.db.delete(snapshots).where(eq(snapshots.id, lost));
    await owner.restart();
    await hostOnline(stack.db, stack.hostIds[0] ?? "");
    await waitFor(() => !existsSync(snapDir(lost)), { what: "the orphan snapshot removed" });
    expect(existsSync(snapDir(kept))).toBe(true);
    const fork = await call("POST", `/snapshots/${kept}/fork`, { name: "kept-fork" });
    expect(fork.status, JSON.stringify(fork.body)).toBe(201);
  });

  it("a socket closed while its hello is being recorded leaves the host offline", async () => {
    const d = await registerHost(stack.db);
    const agent = await fakeAgent(stack.cp.url, d.token);
    // A large inventory keeps the hello's transaction busy; the socket closes meanwhile (the
    // welcome is sent as the hello is taken up, before it is recorded).
    agent.hello({ inventory: made(AGENT_LIMITS.inventory, "closing") });
    await agent.next(isWelcome);
    agent.close();
    await agent.closed;
    const row = async () => (await stack.db.select().from(hosts).where(eq(hosts.id, d.hostId)))[0];
    // The hello was recorded (connected_at is written with it)…
    await waitFor(async () => (await row())?.connectedAt, {
      timeoutMs: 30_000,
      what: "the hello to be recorded",
    });
    // …and the disconnect after it: the host is not shown online without a socket.
    await waitFor(async () => (await row())?.status === "offline", {
      timeoutMs: 10_000,
      what: "the host to be offline",
    });
  });
});
