// The agent as a real process: started the way hosts run it, killed the way hosts die.
import { type ChildProcess, spawn } from "node:child_process";
import { readdir, readFile } from "node:fs/promises";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { describe, expect, it, onTestFinished } from "vitest";
import {
  command,
  fakeControlPlane,
  type LogLine,
  recordingContext,
  SIM_DEFAULTS,
  spec,
  tempDir,
  waitFor,
} from "../testing/index.ts";
import { SimDriver } from "./drivers/sim/sim-driver.ts";
import { agentPaths } from "./paths.ts";

const REPO_ROOT = fileURLToPath(new URL("../..", import.meta.url));

interface AgentProcess {
  child: ChildProcess;
  lines: LogLine[];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** `node --import tsx`, not `npx tsx`: the tsx CLI runs the script in a child process, and a
 * SIGKILL to the CLI would leave that child running. */
function spawnAgent(env: Record<string, string>): AgentProcess {
  const child = spawn(process.execPath, ["--import", "tsx", "host-agent/src/main.ts"], {
    cwd: REPO_ROOT,
    env: { PATH: process.env.PATH, ...env },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const lines: LogLine[] = [];
  if (child.stdout) {
    createInterface({ input: child.stdout }).on("line", (line) => lines.push(JSON.parse(line)));
  }
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("exit", (code, signal) => resolve({ code, signal })),
  );
  onTestFinished(async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
    await exited;
  });
  return { child, lines, exited };
}

describe("agent process", () => {
  it("rolls back a fork cut short by kill -9 and never runs it twice", {
    timeout: 30_000,
  }, async () => {
    const cp = await fakeControlPlane();
    const dir = await tempDir();
    const paths = agentPaths(dir);
    const driver = new SimDriver(paths, SIM_DEFAULTS);
    await driver.create(spec("src"), recordingContext("setup-1"));
    await driver.standby("src", recordingContext("setup-2"));
    const env = {
      CONTROL_PLANE_URL: cp.baseUrl,
      HOST_TOKEN: "test-token",
      AGENT_DATA_DIR: dir,
      AGENT_DRIVER: "sim",
      SIM_LATENCY_MS: JSON.stringify({ fork: 3_000 }),
    };

    const first = spawnAgent(env);
    const s1 = await cp.session(1, 15_000);
    await s1.next("hello");
    s1.welcome("host-7");
    const connected = await waitFor("connected", () =>
      first.lines.find((l) => l.msg === "connected"),
    );
    expect(connected).toMatchObject({ level: "info", host_id: "host-7" });
    const fork = command("fork-1", {
      kind: "fork",
      source_id: "src",
      target: spec("dst"),
      target_state: "Running",
    });
    s1.command(fork);
    // Killed once the target exists on disk and its first step is journaled.
    await waitFor("clone-disk to be journaled", async () =>
      (await readFile(paths.journal, "utf8")).includes('"step":"clone-disk"'),
    );
    expect((await readdir(paths.sim.instancesDir)).sort()).toEqual(["dst", "src"]);
    first.child.kill("SIGKILL");
    expect(await first.exited).toEqual({ code: null, signal: "SIGKILL" });

    const second = spawnAgent(env);
    const s2 = await cp.session(2, 15_000);
    const hello = await s2.next("hello");
    expect(hello.inventory).toEqual([expect.objectContaining({ id: "src", state: "Standby" })]);
    expect(hello.in_flight).toEqual([]);
    expect(await readdir(paths.sim.instancesDir)).toEqual(["src"]);
    s2.welcome("host-7");
    s2.command(fork);
    expect(await s2.next("result")).toMatchObject({
      command_id: "fork-1",
      ok: false,
      replayed: true,
      error: { code: "interrupted" },
      instances: [{ id: "src", state: "Standby" }],
    });
    const executed = (await readFile(paths.sim.execLog, "utf8")).trim().split("\n");
    expect(
      executed.map((l) => JSON.parse(l).command_id).filter((id) => id === "fork-1"),
    ).toHaveLength(1);

    second.child.kill("SIGTERM");
    expect(await s2.closed).toEqual({ code: 1000, reason: "agent shutting down" });
    expect(await second.exited).toEqual({ code: 0, signal: null });
    expect(second.lines.map((l) => l.msg)).toContain("recovered interrupted command");
  });

  it("exits 1 with the first wrong variable named", { timeout: 15_000 }, async () => {
    const agent = spawnAgent({
      CONTROL_PLANE_URL: "http://127.0.0.1:1",
      HOST_TOKEN: "t",
      AGENT_DRIVER: "firecracker",
    });
    expect(await agent.exited).toEqual({ code: 1, signal: null });
    expect(agent.lines).toEqual([
      expect.objectContaining({
        level: "error",
        msg: "invalid configuration",
        error: expect.stringMatching(/^AGENT_DRIVER: "firecracker" is not available/),
      }),
    ]);
  });
});
