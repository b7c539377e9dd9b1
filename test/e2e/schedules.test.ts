import { BadRequestError, NotFoundError } from "@onkernel/hypeman";
import { eq, sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { snapshotSchedules } from "../../control-plane/src/db/schema/index.ts";
import {
  type AgentProcess,
  type CpProcess,
  hostOnline,
  hypeman,
  registerHost,
  seedTenant,
  spawnAgent,
  spawnControlPlane,
  type TestDatabase,
  testDatabase,
  waitFor,
} from "../harness.ts";

// Snapshot schedules run by two control-plane replicas on one database, with a schedule
// minute of one second (SNAPSHOT_SCHEDULE_MINUTE_MS): each due time runs exactly once, whichever
// replica claims it; retention keeps the newest; runs missed while nothing ran are made up once.
const MINUTE_MS = 1000;
const INTERVAL = "2m";
const INTERVAL_MS = 2 * MINUTE_MS;

describe("snapshot schedules across replicas", { timeout: 120_000 }, () => {
  let database: TestDatabase;
  let client: ReturnType<typeof hypeman>;
  const cps: CpProcess[] = [];
  let agent: AgentProcess;

  beforeAll(async () => {
    database = await testDatabase();
    const { apiKey } = await seedTenant(database.database.db);
    for (let i = 0; i < 2; i++) {
      cps.push(
        await spawnControlPlane({
          databaseUrl: database.url,
          env: {
            SNAPSHOT_SCHEDULE_MINUTE_MS: String(MINUTE_MS),
            SNAPSHOT_SCHEDULE_TICK_MS: "100",
          },
        }),
      );
    }
    const { hostId, token } = await registerHost(database.database.db);
    agent = await spawnAgent({ cpUrl: cps.map((c) => c.url).join(","), token });
    await hostOnline(database.database.db, hostId);
    client = hypeman(cps[1]?.url ?? "", apiKey);
  }, 60_000);

  afterAll(async () => {
    await agent?.stop();
    await Promise.all(cps.map((cp) => cp.stop()));
    await database?.drop();
  });

  /** The due time a scheduled snapshot's name carries (`tick-20261203-021500`). */
  const dueOf = (name: string) => {
    const m = /-(\d{4})(\d{2})(\d{2})-(\d{2})(\d{2})(\d{2})$/.exec(name);
    if (!m) throw new Error(`not a scheduled name: ${name}`);
    const [y, mo, d, h, mi, s] = m.slice(1).map(Number) as number[];
    return Date.UTC(y ?? 0, (mo ?? 1) - 1, d, h, mi, s);
  };

  it("runs each due time once across replicas, keeps max_count, and leaves hand-made snapshots", async () => {
    const vm = await client.instances.create({ name: "sched", image: "alpine", size: "256MB" });
    const manual = await client.instances.snapshots.create(vm.id, {
      kind: "Standby",
      name: "hand",
    });
    await expect(
      client.instances.snapshotSchedule.update(vm.id, {
        interval: "30s",
        retention: { max_count: 3 },
      }),
    ).rejects.toBeInstanceOf(BadRequestError);
    await expect(
      client.instances.snapshotSchedule.update(vm.id, { interval: INTERVAL, retention: {} }),
    ).rejects.toBeInstanceOf(BadRequestError);
    await expect(client.instances.snapshotSchedule.get(vm.id)).rejects.toBeInstanceOf(
      NotFoundError,
    );

    const set = await client.instances.snapshotSchedule.update(vm.id, {
      interval: INTERVAL,
      name_prefix: "tick",
      metadata: { by: "schedule" },
      retention: { max_count: 3 },
    });
    expect(set).toMatchObject({ instance_id: vm.id, interval: INTERVAL, name_prefix: "tick" });

    // Every scheduled snapshot lives at least until three newer ones exist (6 s): polling every
    // 50 ms sees each of them.
    const seen = new Set<string>();
    await waitFor(
      async () => {
        for (const s of await client.snapshots.list({ source_instance_id: vm.id })) {
          if (s.name?.startsWith("tick-")) {
            expect(s.tags).toEqual({ by: "schedule" });
            seen.add(s.name);
          }
        }
        return seen.size >= 6;
      },
      { timeoutMs: 60_000, what: "six scheduled runs" },
    );
    const dues = [...seen].map(dueOf).sort((a, b) => a - b);
    // One cadence, each due time once: the names differ by whole intervals, none repeats (the
    // name is unique per instance, so a second run of one due time could not have made one).
    for (let i = 1; i < dues.length; i++) {
      const gap = (dues[i] ?? 0) - (dues[i - 1] ?? 0);
      expect(gap).toBeGreaterThanOrEqual(INTERVAL_MS);
      expect(gap % INTERVAL_MS).toBe(0);
    }
    // A second run of a due time would have failed on the name and said so.
    for (const cp of cps) expect(cp.output()).not.toContain("scheduled snapshot failed");
    const after = await client.instances.snapshotSchedule.get(vm.id);
    expect(after.last_error ?? null).toBeNull();
    expect(after.last_snapshot_id).toMatch(/^[a-z0-9]{24}$/);
    expect(Date.parse(after.next_run_at)).toBeGreaterThan(dues.at(-1) ?? 0);

    // Retention: the three newest scheduled ones, and the hand-made one, whatever its age.
    await waitFor(
      async () => {
        const names = (await client.snapshots.list({ source_instance_id: vm.id })).map(
          (s) => s.name ?? "",
        );
        const ticks = names.filter((n) => n.startsWith("tick-"));
        return ticks.length === 3 && names.includes("hand") ? true : undefined;
      },
      { timeoutMs: 10_000, what: "retention to keep three" },
    );
    expect((await client.snapshots.get(manual.id)).name).toBe("hand");

    // Changing only the retention keeps the cadence.
    const kept = await client.instances.snapshotSchedule.update(vm.id, {
      interval: INTERVAL,
      name_prefix: "tick",
      retention: { max_count: 2 },
    });
    expect((Date.parse(kept.next_run_at) - Date.parse(set.next_run_at)) % INTERVAL_MS).toBe(0);
  });

  it("makes up for runs missed while no replica ran by one run, then keeps its cadence", async () => {
    const vm = await client.instances.create({ name: "late", image: "alpine", size: "256MB" });
    await client.instances.snapshotSchedule.update(vm.id, {
      interval: "60m", // an hour of schedule time: one minute here, so no run of its own
      name_prefix: "late",
      retention: { max_count: 100 },
    });
    // Ten intervals overdue, as if every replica had been down for ten hours.
    const db = database.database.db;
    await db
      .update(snapshotSchedules)
      .set({ nextRunAt: sql`now() - interval '600 seconds'` })
      .where(eq(snapshotSchedules.instanceId, vm.id));
    const made = await waitFor(
      async () => {
        const list = await client.snapshots.list({ source_instance_id: vm.id });
        return list.length > 0 ? list : undefined;
      },
      { timeoutMs: 10_000, what: "the overdue run" },
    );
    const schedule = await client.instances.snapshotSchedule.get(vm.id);
    expect(Date.parse(schedule.next_run_at)).toBeGreaterThan(Date.now());
    // One run, not ten: the next due time is the first one of the cadence after now.
    expect(Date.parse(schedule.next_run_at) - Date.now()).toBeLessThanOrEqual(60 * MINUTE_MS);
    expect(made).toHaveLength(1);
    expect((await client.snapshots.list({ source_instance_id: vm.id })).length).toBe(1);

    await client.instances.snapshotSchedule.delete(vm.id);
    await expect(client.instances.snapshotSchedule.get(vm.id)).rejects.toBeInstanceOf(
      NotFoundError,
    );
    // Deleting the instance takes its schedule with it and leaves its snapshots.
    await client.instances.snapshotSchedule.update(vm.id, {
      interval: "60m",
      retention: { max_age: "24h" },
    });
    await client.instances.delete(vm.id);
    const rows = await db
      .select()
      .from(snapshotSchedules)
      .where(eq(snapshotSchedules.instanceId, vm.id));
    expect(rows).toEqual([]);
    expect((await client.snapshots.list({ source_instance_id: vm.id })).length).toBe(1);
  });
});
