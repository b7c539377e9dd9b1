import { readdir } from "node:fs/promises";
import type { Command, Operation, Result } from "@offshoot/shared";
import { describe, expect, it } from "vitest";
import {
  command,
  memoryLogger,
  recordingContext,
  SIM_DEFAULTS,
  spec,
  tempDir,
  waitFor,
} from "../testing/index.ts";
import { Commands } from "./commands.ts";
import { SimDriver } from "./drivers/sim/sim-driver.ts";
import { Journal } from "./journal.ts";
import { type AgentPaths, agentPaths } from "./paths.ts";

/** Starts `cmd` the way Commands would, but freezes it forever once `stopAfter` is journaled:
 * what a kill -9 at that moment leaves on disk. */
async function crashDuring(paths: AgentPaths, cmd: Command, stopAfter: string): Promise<void> {
  const journal = await Journal.open(paths.journal);
  const driver = new SimDriver(paths, SIM_DEFAULTS);
  await journal.begin(cmd);
  const frozen = new Promise<never>(() => {});
  const steps = {
    record: async (step: string) => {
      await journal.step(cmd.id, step);
      if (step === stopAfter) await frozen;
    },
  };
  const op = cmd.op;
  if (op.kind !== "fork") throw new Error("crashDuring drives forks");
  void driver.fork(op, { commandId: cmd.id, steps });
  await waitFor(`step ${stopAfter}`, () => journal.get(cmd.id)?.steps.includes(stopAfter));
  await journal.close();
}

async function restart(paths: AgentPaths) {
  const journal = await Journal.open(paths.journal);
  const driver = new SimDriver(paths, SIM_DEFAULTS);
  const results: Result[] = [];
  const { log, lines } = memoryLogger();
  const commands = new Commands(journal, driver, log, (r) => results.push(r));
  await commands.recover();
  return { journal, driver, commands, results, lines };
}

async function withSource(state: "Stopped" | "Standby") {
  const paths = agentPaths(await tempDir());
  const driver = new SimDriver(paths, SIM_DEFAULTS);
  await driver.create(spec("src"), recordingContext("setup-1"));
  if (state === "Standby") await driver.standby("src", recordingContext("setup-2"));
  else await driver.stop("src", recordingContext("setup-2"));
  return paths;
}

const forkTo = (target_state: "Stopped" | "Running"): Operation => ({
  kind: "fork",
  source_id: "src",
  target: spec("dst"),
  target_state,
});

describe("recovery at start-up", () => {
  it("rolls back a fork interrupted mid-way and answers it as interrupted, never re-running it", async () => {
    const paths = await withSource("Standby");
    const fork = command("fork-1", forkTo("Running"));
    await crashDuring(paths, fork, "clone-snapshot");
    expect((await readdir(paths.sim.instancesDir)).sort()).toEqual(["dst", "src"]);

    const { journal, commands, results, lines } = await restart(paths);
    expect(await readdir(paths.sim.instancesDir)).toEqual(["src"]);
    expect(journal.get("fork-1")?.result).toEqual({
      ok: false,
      error: {
        code: "interrupted",
        message: "agent restarted while fork was in progress; rolled back",
      },
      instances: [expect.objectContaining({ id: "src", state: "Standby", has_snapshot: true })],
    });
    expect(lines).toContainEqual(
      expect.objectContaining({
        msg: "recovered interrupted command",
        command_id: "fork-1",
        steps: ["clone-disk", "clone-snapshot"],
      }),
    );

    expect(commands.handle(fork)).toBe("replayed");
    expect(results).toEqual([
      expect.objectContaining({ command_id: "fork-1", ok: false, replayed: true }),
    ]);
    await journal.close();
  });

  it("rolls back a fork that completed on the host but never journaled its outcome", async () => {
    const paths = await withSource("Stopped");
    await crashDuring(paths, command("fork-1", forkTo("Running")), "boot");
    expect(await new SimDriver(paths, SIM_DEFAULTS).get("dst")).toMatchObject({ state: "Running" });

    const { journal } = await restart(paths);
    expect(await readdir(paths.sim.instancesDir)).toEqual(["src"]);
    expect(journal.get("fork-1")?.result).toMatchObject({
      ok: false,
      error: { code: "interrupted" },
    });
    await journal.close();
  });

  it("never removes a target that another command created", async () => {
    const paths = await withSource("Stopped");
    await new SimDriver(paths, SIM_DEFAULTS).create(spec("dst"), recordingContext("other"));
    const journal = await Journal.open(paths.journal);
    await journal.begin(command("fork-1", forkTo("Stopped"))); // killed before its first step
    await journal.close();

    const after = await restart(paths);
    expect(await after.driver.get("dst")).toMatchObject({ state: "Running" });
    expect(after.journal.get("fork-1")?.result).toMatchObject({
      ok: false,
      error: { code: "interrupted" },
      instances: [{ id: "src" }, { id: "dst" }],
    });
    await after.journal.close();
  });

  it("re-runs an interrupted delete, which is idempotent", async () => {
    const paths = await withSource("Stopped");
    const journal = await Journal.open(paths.journal);
    await journal.begin(command("del-1", { kind: "delete", instance_id: "src" }));
    await journal.close();

    const after = await restart(paths);
    expect(await after.driver.inventory()).toEqual([]);
    expect(after.journal.get("del-1")?.result).toEqual({ ok: true, instances: [] });
    await after.journal.close();
  });

  it("reports an interrupted stop with the state observed now", async () => {
    const paths = await withSource("Stopped");
    const journal = await Journal.open(paths.journal);
    await journal.begin(command("stop-1", { kind: "stop", instance_id: "src" }));
    await journal.close();

    const after = await restart(paths);
    expect(after.journal.get("stop-1")?.result).toEqual({
      ok: false,
      error: {
        code: "interrupted",
        message: "agent restarted while stop was in progress; reporting the state observed now",
      },
      instances: [expect.objectContaining({ id: "src", state: "Stopped" })],
    });
    expect(after.journal.unfinished()).toEqual([]);
    await after.journal.close();
  });
});
