import { readdir } from "node:fs/promises";
import type { Operation } from "@offshoot/shared";
import { describe, expect, it } from "vitest";
import { recordingContext, SIM_DEFAULTS, spec, tempDir } from "../../testing/index.ts";
import { SimDriver, type SimOptions } from "../drivers/sim/sim-driver.ts";
import { agentPaths } from "../paths.ts";
import { execute } from "./index.ts";
import { InstanceLocks } from "./locks.ts";

async function setup(options: Partial<SimOptions> = {}) {
  const paths = agentPaths(await tempDir());
  const driver = new SimDriver(paths, { ...SIM_DEFAULTS, ...options });
  const locks = new InstanceLocks();
  let n = 0;
  const run = (op: Operation) => execute(driver, locks, op, recordingContext(`cmd-${++n}`));
  await run({ kind: "create", instance: spec("src") });
  return { paths, driver, run };
}

const forkOp = (target_state: "Stopped" | "Standby" | "Running", target = "dst"): Operation => ({
  kind: "fork",
  source_id: "src",
  target: spec(target),
  target_state,
});

describe("fork operation", () => {
  it("reports source and target after a fork", async () => {
    const { run } = await setup();
    await run({ kind: "standby", instance_id: "src" });
    expect(await run(forkOp("Running"))).toEqual({
      ok: true,
      instances: [
        expect.objectContaining({ id: "src", state: "Standby" }),
        expect.objectContaining({ id: "dst", state: "Running" }),
      ],
    });
  });

  it("refuses a Running source: the control plane orchestrates standby → fork → restore", async () => {
    const { run, paths } = await setup();
    expect(await run(forkOp("Running"))).toMatchObject({
      ok: false,
      error: { code: "invalid_state", message: expect.stringMatching(/Running/) },
      instances: [{ id: "src", state: "Running" }],
    });
    expect(await readdir(paths.sim.instancesDir)).toEqual(["src"]);
  });

  it("refuses a target id that exists", async () => {
    const { run } = await setup();
    await run({ kind: "stop", instance_id: "src" });
    await run({ kind: "create", instance: spec("dst") });
    expect(await run(forkOp("Stopped"))).toMatchObject({
      ok: false,
      error: { code: "conflict" },
      instances: [{ id: "src" }, { id: "dst", state: "Running" }],
    });
  });

  it("leaves no target behind when an injected fault fails the fork", async () => {
    const { run, paths } = await setup({ fail: { fork: "insufficient_resources" } });
    await run({ kind: "standby", instance_id: "src" });
    expect(await run(forkOp("Running"))).toEqual({
      ok: false,
      error: { code: "insufficient_resources", message: "simulated fork failure (SIM_FAIL)" },
      instances: [expect.objectContaining({ id: "src", state: "Standby", has_snapshot: true })],
    });
    expect(await readdir(paths.sim.instancesDir)).toEqual(["src"]);
  });

  it.each([
    ["Stopped", "Stopped"],
    ["Stopped", "Standby"],
    ["Stopped", "Running"],
    ["Standby", "Stopped"],
    ["Standby", "Standby"],
    ["Standby", "Running"],
  ] as const)("forks a %s source to %s", async (from, to) => {
    const { run } = await setup();
    await run({ kind: from === "Stopped" ? "stop" : "standby", instance_id: "src" });
    expect(await run(forkOp(to))).toMatchObject({
      ok: true,
      instances: [
        { id: "src", state: from },
        { id: "dst", state: to },
      ],
    });
  });

  it("locks the target: a concurrent create of the same id sees the fork's result", async () => {
    const { run } = await setup({ latencyMs: 30 });
    await run({ kind: "stop", instance_id: "src" });
    const [fork, create] = await Promise.all([
      run(forkOp("Stopped")),
      run({ kind: "create", instance: spec("dst") }),
    ]);
    expect(fork).toMatchObject({ ok: true });
    expect(create).toMatchObject({ ok: false, error: { code: "conflict" } });
  });
});
