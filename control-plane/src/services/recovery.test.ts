// Service-level tests against a real Postgres server with a scripted host: the races and
// recovery paths that are hard to hit on purpose through processes.
import {
  type Command,
  type DriverCapabilities,
  type Hello,
  isHostOperation,
  type ObservedInstance,
  type Operation,
  type Result,
} from "@offshoot/shared";
import { and, eq } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { databaseBackends, registerHost, seedTenant, waitFor } from "../../../test/harness.ts";
import type { Db } from "../db/client.ts";
import { hosts, instances, operations } from "../db/schema/index.ts";
import { loadEnv } from "../env.ts";
import type { HostGateway } from "../gateway/host-gateway.ts";
import { silentLog } from "../log.ts";
import { recordHeartbeats } from "./agent-messages/heartbeat.ts";
import { hostConnected } from "./agent-messages/hello.ts";
import type { Services } from "./context.ts";
import { sweepSilentHosts } from "./hosts.ts";
import { createInstance } from "./instances/create.ts";
import { deleteInstance } from "./instances/delete.ts";
import { forkInstance } from "./instances/fork.ts";
import { getInstance } from "./instances/get.ts";
import { restoreInstance } from "./instances/restore.ts";
import { standbyInstance } from "./instances/standby.ts";
import { startInstance } from "./instances/start.ts";
import { stopInstance } from "./instances/stop.ts";
import { Operations } from "./operations.ts";
import { Signals } from "./signals.ts";

const CAPS: DriverCapabilities = {
  hypervisors: ["qemu"],
  fork_from_stopped: true,
  fork_from_standby: true,
  standby: true,
  hotplug_memory: true,
  disk_io_limit: true,
  volumes: true,
  images: false,
  min_memory_bytes: 0,
  snapshot_compression: false,
};

const ipNum = (ip: string) => ip.split(".").reduce((n, x) => n * 256 + Number(x), 0);
/** The lowest address past the bridge's (`subnet`'s first) that `used` lacks. */
function lowestFree(used: string[], subnet: string): string {
  const taken = new Set(used);
  const base = ipNum(subnet.split("/")[0] ?? "");
  for (let i = 2; ; i++) {
    const ip = [24, 16, 8, 0].map((s) => Math.floor((base + i) / 2 ** s) % 256).join(".");
    if (!taken.has(ip)) return ip;
  }
}

type Answer = (op: Operation, id: string) => Omit<Result, "v" | "type" | "command_id"> | null;

/** A host that answers commands with a script (default: the obvious success), in-process. */
class ScriptedHost implements HostGateway {
  reachesDirectly(): boolean {
    return true;
  }
  states = new Map<string, ObservedInstance>();
  sent: Command[] = [];
  script: Answer[] = [];
  connected = true;
  s!: Services;
  hostId = "";
  /** Results still being recorded; awaited before the database goes away. */
  inFlight = new Set<Promise<void>>();
  /** How long the host takes to answer (0: on the next turn). */
  delayMs = 0;
  /** What commands being executed hold, per instance: a fork holds its source shared. */
  private holds = new Map<string, Array<"shared" | "exclusive">>();
  /** Commands that arrived while another one held their instance against them. */
  overlaps: string[] = [];
  private heartbeats: NodeJS.Timeout | undefined;
  private beat: Promise<void> = Promise.resolve();
  private heartbeatError: unknown;

  /** Heartbeats every `ms` while connected, as an agent does, so that the host stays placeable
   * however long the tests take; one that finds the host marked offline is followed by a hello
   * (the agent's resync). */
  startHeartbeats(ms: number): void {
    this.heartbeats = setInterval(() => {
      if (!this.connected) return;
      this.beat = this.beat
        .then(async () => {
          if ((await recordHeartbeats(this.s, [this.hostId])).length === 0) return;
          if (this.connected) await hostConnected(this.s, this.hostId, this.hello(), new Date());
        })
        .catch((e: unknown) => {
          this.heartbeatError ??= e;
        });
    }, ms);
  }
  /** Stops heartbeating; throws what a heartbeat failed with, if one did. */
  async stopHeartbeats(): Promise<void> {
    clearInterval(this.heartbeats);
    await this.beat;
    if (this.heartbeatError) throw this.heartbeatError;
  }

  async openStream(): Promise<undefined> {
    return undefined;
  }

  async openLogs(): Promise<undefined> {
    return undefined; // logs are covered end to end with real agents
  }
  send(_hostId: string, command: Command): boolean {
    if (!this.connected) return false;
    this.sent.push(command);
    // As an agent's journal does: a command re-sent while it runs is already in flight, and
    // one re-sent after it ran is answered again, not run again.
    if (this.running.has(command.id)) return true;
    const before = this.answers.get(command.id);
    if (before) {
      this.answer(command.id, { ...before, replayed: true }, Promise.resolve(), () => {});
      return true;
    }
    this.running.add(command.id);
    const taken = this.take(command.op);
    const answer = this.script.shift()?.(command.op, command.id) ?? this.obvious(command.op);
    this.answers.set(command.id, answer);
    const answered = this.delayMs
      ? new Promise<void>((resolve) => setTimeout(resolve, this.delayMs))
      : new Promise<void>((resolve) => setImmediate(resolve));
    this.answer(command.id, answer, answered, () => {
      taken();
      this.running.delete(command.id);
    });
    return true;
  }
  private running = new Set<string>();
  private answers = new Map<string, NonNullable<ReturnType<Answer>>>();
  private answer(
    id: string,
    answer: NonNullable<ReturnType<Answer>>,
    after: Promise<void>,
    finished: () => void,
  ) {
    const done = after.then(() => {
      finished();
      return this.s.ops.complete(this.hostId, {
        v: 1,
        type: "result",
        command_id: id,
        ...answer,
      } as Result);
    });
    this.inFlight.add(done);
    void done.finally(() => this.inFlight.delete(done));
  }
  /** Records what `op` holds while it runs, noting any overlap; returns the release. */
  private take(op: Operation): () => void {
    const wants: Array<[string, "shared" | "exclusive"]> =
      op.kind === "fork"
        ? [
            [op.source_id, "shared"],
            [op.target.id, "exclusive"],
          ]
        : isHostOperation(op)
          ? []
          : [[op.kind === "create" ? op.instance.id : op.instance_id, "exclusive"]];
    for (const [id, mode] of wants) {
      const held = this.holds.get(id) ?? [];
      if (held.includes("exclusive") || (mode === "exclusive" && held.length > 0)) {
        this.overlaps.push(`${op.kind} on ${id} while it was held (${held.join(", ")})`);
      }
      this.holds.set(id, [...held, mode]);
    }
    return () => {
      for (const [id, mode] of wants) {
        const held = this.holds.get(id) ?? [];
        held.splice(held.indexOf(mode), 1);
      }
    };
  }
  set(id: string, state: ObservedInstance["state"]): ObservedInstance {
    const o = { id, state, has_snapshot: state === "Standby" };
    this.states.set(id, o);
    return o;
  }
  private obvious(op: Operation): Omit<Result, "v" | "type" | "command_id"> {
    switch (op.kind) {
      case "create":
        return { ok: true, instances: [this.set(op.instance.id, "Running")] };
      case "start":
      case "restore":
        return { ok: true, instances: [this.set(op.instance_id, "Running")] };
      case "stop":
        return { ok: true, instances: [this.set(op.instance_id, "Stopped")] };
      case "standby":
        return { ok: true, instances: [this.set(op.instance_id, "Standby")] };
      case "delete":
        this.states.delete(op.instance_id);
        return { ok: true, instances: [] };
      case "fork":
        return {
          ok: true,
          instances: [
            this.states.get(op.source_id) as ObservedInstance,
            this.set(op.target.id, op.target_state),
          ],
        };
      case "image_pull":
      case "volume_create":
      case "volume_delete":
      case "snapshot_create":
      case "snapshot_restore":
      case "snapshot_delete":
      case "snapshot_compress":
        throw new Error(`the scripted host runs no ${op.kind}`);
    }
  }
  hello(): Hello {
    return {
      v: 1,
      type: "hello",
      agent_version: "test",
      host_name: "scripted",
      driver: "scripted",
      capabilities: CAPS,
      capacity: { vcpus: 64, memory_bytes: 64 * 2 ** 30 },
      inventory: [...this.states.values()],
      image_digests: [],
      images: [],
      in_flight: [],
    };
  }
}

describe.each(databaseBackends)("recovery and races (scripted host, %s)", (_name, open) => {
  let drop: () => Promise<void>;
  let db: Db;
  let s: Services;
  let host: ScriptedHost;
  let tenantId: string;
  const spec = (name: string) => ({ name, image: "alpine", vcpus: 1, size: "256MB" });

  beforeAll(async () => {
    ({ db, close: drop } = await open());
    tenantId = (await seedTenant(db)).tenantId;
    host = new ScriptedHost();
    const signals = new Signals();
    // The host heartbeats (below) every 200 ms, so the length of the file does not matter; the
    // grace period is long enough that neither does a stalled event loop (PGlite runs in this
    // thread: on a loaded machine heartbeats were seen 2 s apart). Nothing here waits for a
    // host to be found silent. A command waits long enough that only a hang runs into its
    // timeout.
    // vCPUs strict: the capacity tests below count the host's own vCPUs.
    const env = loadEnv({
      HOST_GRACE_MS: "30000",
      COMMAND_TIMEOUT_MS: "30000",
      VCPU_OVERCOMMIT: "1",
    });
    s = {
      db,
      env,
      gateway: host,
      signals,
      ops: new Operations(db, host, signals, silentLog),
      log: silentLog,
    };
    host.s = s;
    host.hostId = (await registerHost(db)).hostId;
    await hostConnected(s, host.hostId, host.hello(), new Date());
    host.startHeartbeats(200);
  });
  afterAll(async () => {
    try {
      await host.stopHeartbeats();
    } finally {
      await Promise.all(host.inFlight);
      await drop();
    }
  });

  it("a hello racing lifecycle calls never deadlocks into a failure", async () => {
    await createInstance(s, tenantId, spec("race-a"));
    for (let i = 0; i < 30; i++) {
      const state = (await getInstance(s, tenantId, "race-a")).state;
      const verb =
        state === "Running"
          ? stopInstance(s, tenantId, "race-a")
          : startInstance(s, tenantId, "race-a", {});
      const results = await Promise.allSettled([
        verb,
        hostConnected(s, host.hostId, host.hello(), new Date()),
      ]);
      // A hello may legitimately change the state under the verb (409); a deadlock or any
      // other failure may not surface.
      for (const r of results) {
        if (r.status === "rejected") expect(String(r.reason)).toMatch(/^InvalidStateError/);
      }
    }
    await expect
      .poll(
        async () =>
          (await db.select().from(operations).where(eq(operations.status, "pending"))).length,
      )
      .toBe(0);
  });

  it("a sweep racing a hello never leaves a live host offline", async () => {
    for (let i = 0; i < 20; i++) {
      await Promise.all([
        sweepSilentHosts(s),
        hostConnected(s, host.hostId, host.hello(), new Date()),
      ]);
      const [h] = await db.select().from(hosts).where(eq(hosts.id, host.hostId));
      expect(h?.status).toBe("online");
    }
    expect(await recordHeartbeats(s, [host.hostId])).toEqual([]);
  });

  it("a replayed result does not overwrite the newer state a hello reported", async () => {
    const inst = await createInstance(s, tenantId, spec("replay-a"));
    await stopInstance(s, tenantId, "replay-a");
    // The guest was started, the result lost, the guest exited; hello says Stopped, then the
    // re-sent start is answered from the journal with the old "Running".
    host.script.push((op) => {
      host.set(inst.id, "Stopped");
      void op;
      return {
        ok: true,
        instances: [{ id: inst.id, state: "Running", has_snapshot: false }],
        replayed: true,
      };
    });
    await startInstance(s, tenantId, "replay-a", {});
    expect((await getInstance(s, tenantId, "replay-a")).state).toBe("Stopped");
  });

  it("from_running: a standby interrupted after its snapshot still gets the source restored", async () => {
    const src = await createInstance(s, tenantId, spec("fr-a"));
    host.script.push(() => ({
      ok: false,
      error: { code: "interrupted", message: "agent restarted while standby was in progress" },
      instances: [host.set(src.id, "Standby")],
    }));
    await expect(
      forkInstance(s, tenantId, "fr-a", { name: "fr-a-f", from_running: true }),
    ).rejects.toThrow(/standby/);
    expect((await getInstance(s, tenantId, "fr-a")).state).toBe("Running");
    expect(host.sent.at(-1)?.op).toMatchObject({ kind: "restore", instance_id: src.id });
    await expect(getInstance(s, tenantId, "fr-a-f")).rejects.toThrow(/not found/);
  });

  it("from_running: an interrupted restore is tried again and the fork is kept", async () => {
    const src = await createInstance(s, tenantId, spec("fr-b"));
    host.script.push(
      () => null, // standby
      () => null, // fork
      () => ({
        ok: false,
        error: { code: "interrupted", message: "agent restarted" },
        instances: [host.set(src.id, "Standby")],
      }),
    );
    const fork = await forkInstance(s, tenantId, "fr-b", { name: "fr-b-f", from_running: true });
    expect(fork.state).toBe("Running");
    expect((await getInstance(s, tenantId, "fr-b")).state).toBe("Running");
    const restores = host.sent.filter(
      (c) => c.op.kind === "restore" && c.op.instance_id === src.id,
    );
    expect(restores.length).toBe(2);
  });

  it("a fork and a lifecycle verb racing on one source never run on the host at once", async () => {
    const { id } = await createInstance(s, tenantId, spec("race-fork"));
    await standbyInstance(s, tenantId, "race-fork");
    host.delayMs = 15; // the host is slow: a race that slips through overlaps on it
    const outcomes = new Set<string>();
    try {
      for (let i = 0; i < 12; i++) {
        // By name and by id prefix (checked another way, see lockChecked), in turn.
        const [ref, other] =
          i % 2 === 0 ? ["race-fork", id.slice(0, 12)] : [id.slice(0, 12), "race-fork"];
        const [fork, restore] = await Promise.allSettled([
          forkInstance(s, tenantId, ref, { name: `race-fork-${i}`, from_running: false }),
          restoreInstance(s, tenantId, other),
        ]);
        for (const r of [fork, restore]) {
          // Each either applies or is refused with 409 because the other holds the source.
          if (r.status === "rejected") expect(String(r.reason)).toMatch(/^InvalidStateError/);
        }
        outcomes.add(`${fork.status}/${restore.status}`);
        if (fork.status === "fulfilled") await deleteInstance(s, tenantId, `race-fork-${i}`);
        if ((await getInstance(s, tenantId, "race-fork")).state === "Running") {
          await standbyInstance(s, tenantId, "race-fork");
        }
      }
    } finally {
      host.delayMs = 0;
    }
    expect(host.overlaps).toEqual([]);
    // The race was run: at least one round refused one of the two.
    expect([...outcomes].some((o) => o.includes("rejected"))).toBe(true);
  });

  it("gives each instance on a host its own address, reusing the lowest freed one", async () => {
    const a = await createInstance(s, tenantId, spec("ip-a"));
    const b = await createInstance(s, tenantId, spec("ip-b"));
    const c = await createInstance(s, tenantId, spec("ip-c"));
    const ips = [a, b, c].map((i) => i.network?.ip);
    expect(new Set(ips).size).toBe(3);
    await deleteInstance(s, tenantId, "ip-b");
    const d = await createInstance(s, tenantId, spec("ip-d"));
    const rows = await db
      .select({ ip: instances.ip })
      .from(instances)
      .where(eq(instances.hostId, host.hostId));
    const all = rows.map((r) => r.ip ?? "").sort((x, y) => ipNum(x) - ipNum(y));
    // The lowest free address: b's if nothing lower was free.
    const [h] = await db
      .select({ subnet: hosts.subnet })
      .from(hosts)
      .where(eq(hosts.id, host.hostId));
    expect(d.network?.ip).toBe(
      lowestFree(
        all.filter((ip) => ip !== d.network?.ip),
        h?.subnet ?? "",
      ),
    );
    expect(new Set(all).size).toBe(all.length);
  });

  it("holds a from_running source's capacity while it is briefly in Standby", async () => {
    const [h] = await db.select().from(hosts).where(eq(hosts.id, host.hostId));
    const before = await db.select().from(instances).where(eq(instances.hostId, host.hostId));
    const used = before
      .filter((r) => ["Running", "Created"].includes(r.state))
      .reduce((n, r) => n + r.vcpus, 0);
    const freeVcpus = (h?.vcpus ?? 0) - used;
    expect(freeVcpus).toBeGreaterThanOrEqual(2);
    const src = await createInstance(s, tenantId, { ...spec("cap-src"), vcpus: freeVcpus - 1 });
    let attempt: Promise<string> | undefined;
    host.script.push(
      () => null, // standby
      (op) => {
        // While the host forks, someone asks for the last free vCPU plus one more.
        attempt = createInstance(s, tenantId, { ...spec("cap-squeeze"), vcpus: 2 }).then(
          () => "placed",
          (e: unknown) => String(e),
        );
        void op;
        return null;
      },
    );
    // The fork to Stopped needs no capacity of its own; the source keeps its vCPUs.
    await forkInstance(s, tenantId, "cap-src", {
      name: "cap-f",
      from_running: true,
      target_state: "Stopped",
    });
    expect(await attempt).toMatch(/no host has room/);
    expect((await getInstance(s, tenantId, "cap-src")).state).toBe("Running");
    void src;
  });

  it("delete on a host that is away supersedes pending work, frees the name, and is sent on return", async () => {
    const inst = await createInstance(s, tenantId, spec("away-a"));
    host.connected = false;
    const stop = stopInstance(s, tenantId, "away-a").catch((e: unknown) => e);
    // The stop is recorded, and waits for the host, before the host is found away.
    await waitFor(
      async () =>
        (
          await db
            .select()
            .from(operations)
            .where(and(eq(operations.instanceId, inst.id), eq(operations.kind, "stop")))
        )[0]?.status === "pending",
      { what: "the stop to be recorded" },
    );
    await db.update(hosts).set({ status: "offline" }).where(eq(hosts.id, host.hostId));
    await deleteInstance(s, tenantId, "away-a");
    expect(String(await stop)).toMatch(/superseded by a delete while the host was away/);
    await expect(getInstance(s, tenantId, "away-a")).rejects.toThrow(/not found/);
    const ops = await db
      .select()
      .from(operations)
      .where(and(eq(operations.status, "pending"), eq(operations.hostId, host.hostId)));
    expect(ops.map((o) => o.kind)).toEqual(["delete"]);
    host.connected = true;
    await hostConnected(s, host.hostId, host.hello(), new Date());
    expect(host.states.has(inst.id)).toBe(false);
    await expect
      .poll(
        async () =>
          (await db.select().from(operations).where(eq(operations.status, "pending"))).length,
      )
      .toBe(0);
  });
});
