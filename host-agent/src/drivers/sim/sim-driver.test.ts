import { readdir, readFile, stat, writeFile } from "node:fs/promises";
import type { ObservedInstance } from "@offshoot/shared";
import { describe, expect, it } from "vitest";
import { recordingContext, SIM_DEFAULTS, spec, tempDir } from "../../../testing/index.ts";
import { agentPaths } from "../../paths.ts";
import { SimDriver, type SimOptions } from "./sim-driver.ts";

async function setup(options: Partial<SimOptions> = {}) {
  const paths = agentPaths(await tempDir());
  return { paths, driver: new SimDriver(paths, { ...SIM_DEFAULTS, ...options }) };
}

const exists = (file: string) =>
  stat(file).then(
    () => true,
    () => false,
  );

describe("sim driver", () => {
  it("runs the lifecycle with the observed fields a real host reports", async () => {
    const { driver, paths } = await setup();
    const created = await driver.create(spec("i1"), recordingContext("c1"));
    expect(created).toMatchObject({
      id: "i1",
      state: "Running",
      has_snapshot: false,
      stopped_at: null,
    });
    expect(created.started_at).toEqual(expect.any(String));

    const stopped = await driver.stop("i1", recordingContext("c2"));
    expect(stopped).toMatchObject({ state: "Stopped", has_snapshot: false, exit_code: null });
    expect(stopped.stopped_at).toEqual(expect.any(String));

    expect(
      await driver.start({ instance_id: "i1", cmd: ["sleep", "1"] }, recordingContext("c3")),
    ).toMatchObject({
      state: "Running",
    });
    const standby = await driver.standby("i1", recordingContext("c4"));
    expect(standby).toMatchObject({ state: "Standby", has_snapshot: true });
    expect(await exists(paths.sim.snapshotFile("i1"))).toBe(true);

    expect(await driver.restore("i1", recordingContext("c5"))).toMatchObject({
      state: "Running",
      has_snapshot: false,
    });
    expect(await exists(paths.sim.snapshotFile("i1"))).toBe(false);

    await driver.delete("i1", recordingContext("c6"));
    expect(await driver.get("i1")).toBeNull();
    await driver.delete("i1", recordingContext("c7")); // idempotent
    expect(await driver.inventory()).toEqual([]);

    const log = (await readFile(paths.sim.execLog, "utf8"))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(log.map((l) => [l.command_id, l.kind, l.instance_id])).toEqual([
      ["c1", "create", "i1"],
      ["c2", "stop", "i1"],
      ["c3", "start", "i1"],
      ["c4", "standby", "i1"],
      ["c5", "restore", "i1"],
      ["c6", "delete", "i1"],
      ["c7", "delete", "i1"],
    ]);
  });

  it("keeps instances across a new driver, as VMs outlive an agent restart", async () => {
    const { driver, paths } = await setup();
    await driver.create(spec("i1"), recordingContext("c1"));
    await driver.create(spec("i2"), recordingContext("c2"));
    await driver.standby("i2", recordingContext("c3"));

    const after = new SimDriver(paths, SIM_DEFAULTS);
    const inventory = await after.inventory();
    expect(inventory.map((i) => [i.id, i.state]).sort()).toEqual([
      ["i1", "Running"],
      ["i2", "Standby"],
    ]);
  });

  it("reports an unreadable state file as Unknown rather than hiding the instance", async () => {
    const { driver, paths } = await setup();
    await driver.create(spec("i1"), recordingContext("c1"));
    await writeFile(paths.sim.stateFile("i1"), "{");
    expect(await driver.inventory()).toEqual([
      expect.objectContaining({
        id: "i1",
        state: "Unknown",
        state_error: expect.stringMatching(/unreadable/),
      }),
    ]);
  });

  it("forks a Standby source to Running by restoring a cloned snapshot; the source is untouched", async () => {
    const { driver, paths } = await setup();
    await driver.create(spec("src"), recordingContext("c1"));
    await driver.standby("src", recordingContext("c2"));
    const ctx = recordingContext("c3");
    const [source, target] = await driver.fork(
      { source_id: "src", target: spec("dst"), target_state: "Running" },
      ctx,
    );
    expect(ctx.recorded).toEqual(["clone-disk", "clone-snapshot", "register", "restore"]);
    expect(source).toMatchObject({ id: "src", state: "Standby", has_snapshot: true });
    expect(target).toMatchObject({ id: "dst", state: "Running", has_snapshot: false });
    expect(await readFile(paths.sim.diskFile("dst"), "utf8")).toBe(
      await readFile(paths.sim.diskFile("src"), "utf8"),
    );
    expect(await exists(paths.sim.snapshotFile("src"))).toBe(true);
  });

  it.each([
    ["Stopped", "Stopped", ["clone-disk", "register"], { state: "Stopped", has_snapshot: false }],
    [
      "Stopped",
      "Standby",
      ["clone-disk", "register", "boot", "snapshot"],
      { state: "Standby", has_snapshot: true },
    ],
    [
      "Standby",
      "Running",
      ["clone-disk", "clone-snapshot", "register", "restore"],
      { state: "Running", has_snapshot: false },
    ],
    [
      "Stopped",
      "Running",
      ["clone-disk", "register", "boot"],
      { state: "Running", has_snapshot: false },
    ],
    [
      "Standby",
      "Standby",
      ["clone-disk", "clone-snapshot", "register"],
      { state: "Standby", has_snapshot: true },
    ],
    ["Standby", "Stopped", ["clone-disk", "register"], { state: "Stopped", has_snapshot: false }],
  ] as const)("forks %s → %s", async (from, to, steps, expected) => {
    const { driver, paths } = await setup();
    await driver.create(spec("src"), recordingContext("c1"));
    if (from === "Stopped") await driver.stop("src", recordingContext("c2"));
    else await driver.standby("src", recordingContext("c2"));
    const ctx = recordingContext("c3");
    const [, target] = await driver.fork(
      { source_id: "src", target: spec("dst"), target_state: to },
      ctx,
    );
    expect(ctx.recorded).toEqual(steps);
    expect(target).toMatchObject(expected);
    expect(await exists(paths.sim.snapshotFile("dst"))).toBe(expected.has_snapshot);
  });

  it("refuses to fork a Running source", async () => {
    const { driver, paths } = await setup();
    await driver.create(spec("src"), recordingContext("c1"));
    const fork = driver.fork(
      { source_id: "src", target: spec("dst"), target_state: "Running" },
      recordingContext("c2"),
    );
    await expect(fork).rejects.toMatchObject({ code: "invalid_state" });
    expect(await exists(paths.sim.instanceDir("dst"))).toBe(false);
  });

  it("forks Stopped → Standby by booting the clone and snapshotting it, as Hypeman does", async () => {
    const { driver, paths } = await setup();
    await driver.create(spec("src"), recordingContext("c1"));
    await driver.stop("src", recordingContext("c2"));
    const ctx = recordingContext("c3");
    const [source, target] = await driver.fork(
      { source_id: "src", target: spec("dst"), target_state: "Standby" },
      ctx,
    );
    expect(ctx.recorded).toEqual(["clone-disk", "register", "boot", "snapshot"]);
    expect(source).toMatchObject({ state: "Stopped", has_snapshot: false });
    expect(target).toMatchObject({ state: "Standby", has_snapshot: true });
    expect(target.started_at).toEqual(expect.any(String));
    expect(await exists(paths.sim.snapshotFile("dst"))).toBe(true);
    expect(await exists(paths.sim.snapshotFile("src"))).toBe(false);
  });

  it("undoes every step of a Stopped → Standby fork that fails at the end", async () => {
    const { driver, paths } = await setup({ fail: { fork: "insufficient_resources" } });
    await driver.create(spec("src"), recordingContext("c1"));
    await driver.stop("src", recordingContext("c2"));
    const ctx = recordingContext("c3");
    const fork = driver.fork(
      { source_id: "src", target: spec("dst"), target_state: "Standby" },
      ctx,
    );
    await expect(fork).rejects.toMatchObject({ code: "insufficient_resources" });
    expect(ctx.recorded).toEqual(["clone-disk", "register", "boot", "snapshot"]);
    expect(await readdir(paths.sim.instancesDir)).toEqual(["src"]);
  });

  it("reports an existing target as a conflict and leaves it alone", async () => {
    const { driver } = await setup();
    await driver.create(spec("src"), recordingContext("c1"));
    await driver.stop("src", recordingContext("c2"));
    await driver.create(spec("dst"), recordingContext("c3"));
    const fork = driver.fork(
      { source_id: "src", target: spec("dst"), target_state: "Stopped" },
      recordingContext("c4"),
    );
    await expect(fork).rejects.toMatchObject({ code: "conflict" });
    expect(await driver.get("dst")).toMatchObject({ state: "Running" });
  });

  it("injects SIM_FAIL faults after doing and undoing every step", async () => {
    const { driver, paths } = await setup({
      fail: { fork: "insufficient_resources", restore: "internal_error" },
    });
    await driver.create(spec("src"), recordingContext("c1"));
    await driver.standby("src", recordingContext("c2"));

    const forkCtx = recordingContext("c3");
    const fork = driver.fork(
      { source_id: "src", target: spec("dst"), target_state: "Running" },
      forkCtx,
    );
    await expect(fork).rejects.toMatchObject({ code: "insufficient_resources" });
    expect(forkCtx.recorded).toEqual(["clone-disk", "clone-snapshot", "register", "restore"]);
    expect(await exists(paths.sim.instanceDir("dst"))).toBe(false);

    await expect(driver.restore("src", recordingContext("c4"))).rejects.toMatchObject({
      code: "internal_error",
    });
    expect(await driver.get("src")).toMatchObject({ state: "Standby", has_snapshot: true });
    expect(await exists(paths.sim.snapshotFile("src"))).toBe(true);
  });

  it("spreads latency across steps and can be configured per kind", async () => {
    const { driver, paths } = await setup({ latencyMs: { create: 1_000 } });
    // An instance to stop, made without latency.
    await new SimDriver(paths, SIM_DEFAULTS).create(spec("i1"), recordingContext("c1"));
    const finished: string[] = [];
    let firstStep!: () => void;
    const stepped = new Promise<void>((resolve) => {
      firstStep = resolve;
    });
    const t0 = Date.now();
    let createMs = 0;
    const creating = driver
      .create(spec("i2"), { commandId: "c2", steps: { record: async () => firstStep() } })
      .then(() => {
        createMs = Date.now() - t0;
        finished.push("create");
      });
    // Half-way through the create (its first of two steps is done), a stop: it has no latency
    // of its own, so it ends before the create's second half; with the create's, it would not.
    await stepped;
    await driver.stop("i1", recordingContext("c3"));
    finished.push("stop");
    await creating;
    expect(finished).toEqual(["stop", "create"]);
    expect(createMs).toBeGreaterThanOrEqual(950);
  });

  it("emits an event when a guest exits on its own", async () => {
    const { driver } = await setup();
    await driver.create(spec("i1"), recordingContext("c1"));
    const events: ObservedInstance[] = [];
    const off = driver.onEvent((i) => events.push(i));
    await driver.simulateExit("i1", 3, "segfault");
    off();
    await driver.simulateExit("i1", 4, "ignored");
    expect(events).toEqual([
      expect.objectContaining({
        id: "i1",
        state: "Stopped",
        exit_code: 3,
        exit_message: "segfault",
      }),
    ]);
  });

  it("rejects instance ids that could escape the data dir", async () => {
    const { driver } = await setup();
    await expect(driver.create(spec("../evil"), recordingContext("c1"))).rejects.toMatchObject({
      code: "invalid_request",
    });
  });
});
