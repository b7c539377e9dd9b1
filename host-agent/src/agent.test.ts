import { readdir, readFile, stat } from "node:fs/promises";
import { CLOSE } from "@offshoot/shared";
import { describe, expect, it, onTestFinished } from "vitest";
import {
  agentConfig,
  command,
  fakeControlPlane,
  memoryLogger,
  recordingContext,
  SIM_DEFAULTS,
  spec,
  tempDir,
  waitFor,
} from "../testing/index.ts";
import { type AgentOptions, backoffDelay, startAgent } from "./agent.ts";
import type { SimConfig } from "./config.ts";
import { SimDriver } from "./drivers/sim/sim-driver.ts";
import { agentPaths } from "./paths.ts";

async function launch(sim: Partial<SimConfig> = {}, options: AgentOptions = {}, autoPong = true) {
  const cp = await fakeControlPlane({ autoPong });
  const dir = await tempDir();
  const { log, lines } = memoryLogger();
  const agent = await startAgent(agentConfig(dir, cp.url, sim), {
    log,
    backoff: { baseMs: 10, capMs: 100 },
    ...options,
  });
  onTestFinished(() => agent.stop());
  return { cp, dir, agent, lines, paths: agentPaths(dir) };
}

async function execLines(file: string): Promise<Array<{ command_id: string; kind: string }>> {
  const text = await readFile(file, "utf8").catch(() => "");
  return text
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l));
}

describe("agent", () => {
  it("dials the control plane with its token and says hello with inventory and capacity", async () => {
    const cp = await fakeControlPlane();
    const dir = await tempDir();
    const sim = new SimDriver(agentPaths(dir), SIM_DEFAULTS);
    await sim.create(spec("pre"), recordingContext("old"));
    await sim.snapshotCreate(
      { instance_id: "pre", snapshot_id: "presnap", snapshot_kind: "Stopped" },
      recordingContext("snap"),
    );
    const agent = await startAgent(agentConfig(dir, cp.url), { log: memoryLogger().log });
    onTestFinished(() => agent.stop());

    const session = await cp.session(1);
    expect(session.request.url).toBe("/agent/v1/connect");
    expect(session.request.headers.authorization).toBe("Bearer test-token");
    const hello = await session.next("hello");
    expect(hello).toEqual({
      v: 1,
      type: "hello",
      agent_version: "0.1.0",
      host_name: "test-host",
      driver: "sim",
      capabilities: expect.objectContaining({ fork_from_stopped: true, fork_from_standby: true }),
      capacity: { vcpus: 8, memory_bytes: 16 * 1024 ** 3 },
      inventory: [expect.objectContaining({ id: "pre", state: "Running" })],
      images: [],
      image_digests: [],
      in_flight: [],
      snapshots: ["presnap"],
    });
  });

  it("keeps the sim's instances in SIM_STATE_DIR, apart from its journal, across restarts", async () => {
    const stateDir = await tempDir();
    const { cp, dir, agent } = await launch({ stateDir });
    const session = await cp.session(1);
    await session.next("hello");
    session.welcome();
    session.command(command("c1", { kind: "create", instance: spec("i1") }));
    expect(await session.next("result")).toMatchObject({ command_id: "c1", ok: true });
    expect(await readdir(agentPaths(dir, stateDir).sim.instancesDir)).toEqual(["i1"]);
    expect(await readdir(agentPaths(dir).sim.instancesDir).catch(() => [])).toEqual([]);
    await agent.stop();

    const again = await startAgent(agentConfig(dir, cp.url, { stateDir }), {
      log: memoryLogger().log,
    });
    onTestFinished(() => again.stop());
    const hello = await (await cp.session(2)).next("hello");
    expect(hello.inventory).toEqual([expect.objectContaining({ id: "i1", state: "Running" })]);
  });

  it("logs connected with the host id after welcome, then heartbeats", async () => {
    const { cp, agent, lines } = await launch();
    const session = await cp.session(1);
    await session.next("hello");
    expect(session.received.filter((m) => m.type === "heartbeat")).toEqual([]);
    session.welcome("host-42", 30);

    const connected = await waitFor("connected log", () =>
      lines.find((l) => l.msg === "connected"),
    );
    expect(connected).toMatchObject({ level: "info", host_id: "host-42", heartbeat_ms: 30 });
    expect(agent.hostId()).toBe("host-42");
    const first = await session.next("heartbeat");
    const second = await session.next("heartbeat");
    expect(second.sent_at).toBeGreaterThan(first.sent_at);
  });

  it("executes a command once and answers a re-sent one from the journal", async () => {
    const { cp, paths } = await launch();
    const session = await cp.session(1);
    await session.next("hello");
    session.welcome();

    const create = command("cmd-1", { kind: "create", instance: spec("i1") });
    session.command(create);
    const first = await session.next("result");
    expect(first).toMatchObject({
      command_id: "cmd-1",
      ok: true,
      replayed: false,
      instances: [{ id: "i1", state: "Running" }],
    });

    session.command(create);
    const again = await session.next("result");
    expect(again).toEqual({ ...first, replayed: true });
    expect(
      (await execLines(paths.sim.execLog)).filter((l) => l.command_id === "cmd-1"),
    ).toHaveLength(1);
  });

  it("reports failures as results with the observed instances", async () => {
    const { cp } = await launch({ fail: { standby: "insufficient_resources" } });
    const session = await cp.session(1);
    await session.next("hello");
    session.command(command("c1", { kind: "create", instance: spec("i1") }));
    await session.next("result");
    session.command(command("c2", { kind: "standby", instance_id: "i1" }));
    expect(await session.next("result")).toMatchObject({
      command_id: "c2",
      ok: false,
      error: { code: "insufficient_resources" },
      instances: [{ id: "i1", state: "Running" }],
    });
  });

  it("reconnects after the connection drops and delivers the result of a command still running", async () => {
    // The create must still run when the agent's second hello goes out: 3 s of latency leave
    // the reconnect (10 ms backoff) ample time even on a loaded machine.
    const { cp, paths, lines } = await launch({ latencyMs: { create: 3_000 } });
    const first = await cp.session(1);
    await first.next("hello");
    first.welcome("host-1");
    const create = command("slow-1", { kind: "create", instance: spec("i1") });
    first.command(create);
    await waitFor(
      "execution to start",
      async () => (await execLines(paths.sim.execLog)).length === 1,
    );
    first.socket.terminate();

    const second = await cp.session(2);
    const hello = await second.next("hello");
    expect(hello.in_flight).toEqual(["slow-1"]);
    second.welcome("host-1");
    second.command(create); // the control plane re-sends what it has no result for
    expect(await second.next("result", undefined, 30_000)).toMatchObject({
      command_id: "slow-1",
      ok: true,
      replayed: false,
    });
    expect(await execLines(paths.sim.execLog)).toHaveLength(1);
    expect(lines.filter((l) => l.msg === "connected")).toHaveLength(2);
    expect(lines).toContainEqual(expect.objectContaining({ msg: "disconnected", code: 1006 }));
  });

  it("keeps retrying at the maximum backoff when the token is refused", async () => {
    const cp = await fakeControlPlane({
      onConnection: (s) => s.socket.close(CLOSE.unauthorized, "bad token"),
    });
    const { log, lines } = memoryLogger();
    const agent = await startAgent(agentConfig(await tempDir(), cp.url), {
      log,
      backoff: { baseMs: 1, capMs: 80 },
    });
    onTestFinished(() => agent.stop());

    await cp.session(3, 10_000);
    const refusals = lines.filter((l) => l.msg.startsWith("unauthorized"));
    expect(refusals.length).toBeGreaterThanOrEqual(2);
    expect(refusals[0]).toMatchObject({ level: "error", code: 4401, retry_ms: 80 });
  });

  it("treats an upgrade refused with 401 like a 4401", async () => {
    const cp = await fakeControlPlane({ rejectUpgrade: 401 });
    const { log, lines } = memoryLogger();
    const agent = await startAgent(agentConfig(await tempDir(), cp.url), {
      log,
      backoff: { baseMs: 1, capMs: 80 },
    });
    onTestFinished(() => agent.stop());

    await waitFor("two refused upgrades", () => cp.upgradesRefused() >= 2, 10_000);
    expect(lines).toContainEqual(
      expect.objectContaining({ msg: "handshake refused", status: 401 }),
    );
    expect(lines).toContainEqual(
      expect.objectContaining({
        level: "error",
        msg: expect.stringMatching(/^unauthorized/),
        retry_ms: 80,
      }),
    );
  });

  it("treats a silent control plane as dead and reconnects", async () => {
    const { cp, lines } = await launch({}, {}, false);
    const first = await cp.session(1);
    await first.next("hello");
    first.welcome("host-1", 20); // then nothing: no messages, no pongs

    await cp.session(2, 10_000);
    expect(lines).toContainEqual(
      expect.objectContaining({ level: "warn", msg: "control plane unresponsive; reconnecting" }),
    );
  });

  it("forwards state changes the driver observes on its own", async () => {
    const { cp, agent } = await launch();
    const session = await cp.session(1);
    await session.next("hello");
    session.welcome();
    session.command(command("c1", { kind: "create", instance: spec("i1") }));
    await session.next("result");
    await (agent.driver as SimDriver).simulateExit("i1", 137, "killed");
    expect(await session.next("event")).toMatchObject({
      instance: { id: "i1", state: "Stopped", exit_code: 137, exit_message: "killed" },
    });
  });

  it("closes with 1000 on stop and gives the data dir back", async () => {
    const { cp, agent, paths } = await launch();
    const session = await cp.session(1);
    await session.next("hello");
    expect((await stat(paths.pidFile)).isFile()).toBe(true);
    await agent.stop();
    expect(await session.closed).toEqual({ code: 1000, reason: "agent shutting down" });
    await expect(stat(paths.pidFile)).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("refuses a data dir another agent is using", async () => {
    const { dir, cp } = await launch();
    await expect(startAgent(agentConfig(dir, cp.url), { log: memoryLogger().log })).rejects.toThrow(
      /in use/,
    );
  });
});

describe("backoffDelay", () => {
  it("stays within the exponential envelope and the cap", () => {
    for (let attempt = 0; attempt < 12; attempt++) {
      const d = backoffDelay(attempt, 200, 5_000);
      expect(d).toBeGreaterThanOrEqual(0);
      expect(d).toBeLessThan(Math.min(5_000, 200 * 2 ** attempt));
    }
  });
});
