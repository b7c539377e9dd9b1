import { writeFile } from "node:fs/promises";
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
  return { paths, driver, run };
}

describe("operations", () => {
  it("reports success with the changed instances", async () => {
    const { run } = await setup();
    expect(await run({ kind: "create", instance: spec("i1") })).toEqual({
      ok: true,
      instances: [expect.objectContaining({ id: "i1", state: "Running" })],
    });
    expect(await run({ kind: "delete", instance_id: "i1" })).toEqual({ ok: true, instances: [] });
  });

  it("refuses a verb the state does not allow and reports the state as observed", async () => {
    const { run } = await setup();
    await run({ kind: "create", instance: spec("i1") });
    expect(await run({ kind: "start", instance_id: "i1" })).toEqual({
      ok: false,
      error: {
        code: "invalid_state",
        message: "cannot start instance i1 in state Running (needs Stopped)",
      },
      instances: [expect.objectContaining({ id: "i1", state: "Running" })],
    });
    expect(await run({ kind: "restore", instance_id: "i1" })).toMatchObject({
      ok: false,
      error: { code: "invalid_state" },
    });
  });

  it("reports a missing instance as not_found and a duplicate create as conflict", async () => {
    const { run } = await setup();
    expect(await run({ kind: "stop", instance_id: "nope" })).toEqual({
      ok: false,
      error: { code: "not_found", message: "instance nope not found on this host" },
      instances: [],
    });
    await run({ kind: "create", instance: spec("i1") });
    expect(await run({ kind: "create", instance: spec("i1") })).toMatchObject({
      ok: false,
      error: { code: "conflict" },
    });
  });

  it("refuses specs the driver cannot honour", async () => {
    const { run, paths } = await setup();
    const outcome = await run({ kind: "create", instance: spec("i1", { hypervisor: "vz" }) });
    expect(outcome).toMatchObject({
      ok: false,
      error: { code: "not_supported", message: expect.stringMatching(/vz/) },
    });
    expect(await new SimDriver(paths, SIM_DEFAULTS).get("i1")).toBeNull();
  });

  it("allows only delete on an Unknown instance", async () => {
    const { run, paths } = await setup();
    await run({ kind: "create", instance: spec("i1") });
    await writeFile(paths.sim.stateFile("i1"), "garbage");
    expect(await run({ kind: "stop", instance_id: "i1" })).toMatchObject({
      ok: false,
      error: { code: "invalid_state" },
    });
    expect(await run({ kind: "delete", instance_id: "i1" })).toEqual({ ok: true, instances: [] });
  });

  it("rejects an instance id that is not a safe path component", async () => {
    const { run } = await setup();
    expect(await run({ kind: "create", instance: spec("a/../../b") })).toMatchObject({
      ok: false,
      error: { code: "invalid_request" },
    });
  });

  it("serializes operations on one instance in arrival order", async () => {
    const { run } = await setup({ latencyMs: 30 });
    await run({ kind: "create", instance: spec("i1") });
    // Unserialized, both would see Running and both would succeed.
    const [stop, standby] = await Promise.all([
      run({ kind: "stop", instance_id: "i1" }),
      run({ kind: "standby", instance_id: "i1" }),
    ]);
    expect(stop).toMatchObject({ ok: true, instances: [{ state: "Stopped" }] });
    expect(standby).toMatchObject({
      ok: false,
      error: { code: "invalid_state" },
      instances: [{ state: "Stopped" }],
    });
  });
});
