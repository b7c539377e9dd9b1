import { existsSync, readdirSync, readFileSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { agentPaths } from "../../host-agent/src/paths.ts";
import { TEST_IMAGE } from "../../scripts/oci-image.ts";
import { ensureVmAssets } from "../../scripts/vm-assets.ts";
import { type AgentProcess, api, consoleCounts, hostOnline, hypeman, waitFor } from "../harness.ts";
import { qemuAgentEnv, type Stack, startStack } from "./env.ts";

// kill -9 of a QEMU host agent while a fork is in flight, at several points of the fork: the
// guests it started are re-adopted or cleaned up, the control plane converges, nothing runs
// twice. One source guest stays in Standby throughout; each interrupted fork is the only other
// guest, so at most two QEMUs run at once.

/** `qemu-system-*` processes whose command line names this data dir, with the instance each
 * one serves (its serial log is <instances>/<id>/serial.log; its RAM may be a shared memory
 * base). Found by /proc, not by pid files: a guest whose pid nobody recorded is exactly what
 * this test looks for. */
function qemuProcesses(dataDir: string): Array<{ pid: number; id: string | undefined }> {
  const instancesDir = agentPaths(dataDir).qemu.instancesDir;
  const out: Array<{ pid: number; id: string | undefined }> = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    let argv: string[];
    try {
      argv = readFileSync(`/proc/${name}/cmdline`, "utf8").split("\0");
    } catch {
      continue; // exited while we looked
    }
    if (!argv[0]?.includes("qemu-system") || !argv.some((a) => a.includes(dataDir))) continue;
    const dir = argv.map((a) => /path=([^,]+)\/serial\.log(,|$)/.exec(a)?.[1]).find(Boolean);
    const id = dir?.startsWith(`${instancesDir}/`) ? dir.slice(instancesDir.length + 1) : undefined;
    out.push({ pid: Number(name), id });
  }
  return out;
}

interface JournalView {
  /** Fork commands in journal order: id, target id, completed steps, whether done. */
  forks: Array<{ id: string; target: string; steps: string[]; done: boolean }>;
}

/** The agent's journal as it is on disk (a torn last line is skipped). */
function readJournal(dataDir: string): JournalView {
  const file = agentPaths(dataDir).journal;
  const forks = new Map<string, { id: string; target: string; steps: string[]; done: boolean }>();
  if (!existsSync(file)) return { forks: [] };
  for (const line of readFileSync(file, "utf8").split("\n")) {
    let rec: {
      id?: string;
      status?: string;
      step?: string;
      command?: { op?: { kind?: string; target?: { id?: string } } };
    };
    try {
      rec = JSON.parse(line);
    } catch {
      continue;
    }
    if (!rec.id) continue;
    const op = rec.command?.op;
    if (rec.status === "started" && op?.kind === "fork" && op.target?.id) {
      forks.set(rec.id, { id: rec.id, target: op.target.id, steps: [], done: false });
    }
    const f = forks.get(rec.id);
    if (!f) continue;
    if (rec.status === "step" && rec.step) f.steps.push(rec.step);
    if (rec.status === "done") f.done = true;
  }
  return { forks: [...forks.values()] };
}

function instanceDirs(dataDir: string): string[] {
  const dir = agentPaths(dataDir).qemu.instancesDir;
  return existsSync(dir)
    ? readdirSync(dir, { withFileTypes: true })
        .filter((e) => e.isDirectory())
        .map((e) => e.name)
    : [];
}

function baseFiles(dataDir: string): string[] {
  const dir = agentPaths(dataDir).qemu.basesDir;
  return existsSync(dir) ? readdirSync(dir) : [];
}

/**
 * Where to kill the agent, each a condition on what the host shows while the fork runs: `fork`
 * is the fork command as journaled so far, `bases` the frozen bases present before the request.
 */
const KILL_POINTS: Array<{
  name: string;
  hit: (dataDir: string, fork: { target: string; steps: string[] }, bases: string[]) => boolean;
}> = [
  // freeze-disk: a new base has appeared, the source's new overlay is not in place yet
  // (qemu-img create runs for tens of ms).
  {
    name: "freezing the source's disk",
    hit: (dataDir, _f, bases) => baseFiles(dataDir).some((b) => !bases.includes(b)),
  },
  // freeze-memory / clone-memory: the source's RAM file becoming a memory base.
  { name: "freezing guest memory", hit: (_d, f) => f.steps.includes("clone-disk") },
  // restore: the fork's QEMU exists, before the agent has connected QMP and written its pid.
  {
    name: "launching the fork's QEMU",
    hit: (dataDir, f) => qemuProcesses(dataDir).some((p) => p.id === f.target),
  },
  // restore: QEMU recorded, loading the device state and applying the fork's identity.
  {
    name: "restoring the fork",
    hit: (dataDir, f) => existsSync(agentPaths(dataDir).qemu.pidFile(f.target)),
  },
];

describe("kill -9 of a QEMU agent mid-fork", { timeout: 600_000 }, () => {
  let stack: Stack;
  let agent: AgentProcess;
  let client: ReturnType<typeof hypeman>;
  let call: ReturnType<typeof api>;

  beforeAll(async () => {
    await ensureVmAssets();
    stack = await startStack({
      // Guests under TCG on a loaded 2-core machine boot in tens of seconds: requests wait for
      // them (the point is what is left after a crash, not how fast).
      cpEnv: { COMMAND_TIMEOUT_MS: "120000" },
      agents: [qemuAgentEnv({ AGENT_VCPUS: "4" })],
    });
    const a = stack.agents[0];
    if (!a) throw new Error("no agent");
    agent = a;
    client = hypeman(stack.cp.url, stack.apiKey);
    call = api(stack.cp.url, stack.apiKey);
  }, 300_000);

  // Guests outlive their agent by design; whatever a failed test left running goes here.
  afterAll(() => {
    if (!agent) return;
    for (const p of qemuProcesses(agent.dataDir)) {
      try {
        process.kill(p.pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
  });

  const counts = (name: string) => consoleCounts(client, name);

  /** What does not match "the host runs exactly what the API lists": empty once converged. */
  const divergence = async (): Promise<string[]> => {
    const r = await call("GET", "/instances");
    if (r.status !== 200) return [`GET /instances: ${r.status}`];
    const listed = r.body as Array<{ id: string; name: string; state: string }>;
    const byId = new Map(listed.map((i) => [i.id, i]));
    const problems: string[] = [];
    for (const i of listed) {
      if (i.state !== "Running" && i.state !== "Standby") problems.push(`${i.name} is ${i.state}`);
      // An interrupted fork must leave its source restorable, disk included.
      if (!existsSync(agentPaths(agent.dataDir).qemu.diskFile(i.id))) {
        problems.push(`${i.name} has no disk on the host`);
      }
    }
    for (const p of qemuProcesses(agent.dataDir)) {
      const inst = p.id === undefined ? undefined : byId.get(p.id);
      if (inst?.state !== "Running") {
        problems.push(`QEMU pid ${p.pid} for ${p.id ?? "?"} (API: ${inst?.state ?? "no such"})`);
      }
    }
    for (const id of instanceDirs(agent.dataDir)) {
      if (!byId.has(id)) problems.push(`instance dir ${id} of no listed instance`);
    }
    return problems;
  };

  const converged = async (what: string, timeoutMs = 20_000) => {
    let last: string[] = [];
    try {
      await waitFor(
        async () => {
          last = await divergence();
          return last.length === 0;
        },
        { timeoutMs, intervalMs: 200, what },
      );
    } catch (e) {
      // Shows what stayed wrong rather than only that it timed out; if the divergence could
      // not even be worked out (last stays empty), the timeout itself is the failure.
      expect(last, what).toEqual([]);
      throw e;
    }
  };

  it("forks interrupted at each step are rolled back or kept, never doubled, and leave no orphans", async () => {
    const src = await client.instances.create({
      name: "crash-src",
      image: TEST_IMAGE,
      size: "128MB",
      vcpus: 1,
    });
    expect(src.state).toBe("Running");
    await waitFor(async () => (await counts("crash-src")).length >= 2, {
      timeoutMs: 30_000,
      what: "the source to count",
    });
    expect((await client.instances.standby("crash-src")).state).toBe("Standby");
    // Standby: its count is frozen, and every fork of it must go on from here.
    const last = (await counts("crash-src")).at(-1);
    if (last === undefined) throw new Error("the source printed no count");

    const outcomes: string[] = [];
    for (const [n, point] of KILL_POINTS.entries()) {
      const name = `crash-fork-${n}`;
      const forksBefore = readJournal(agent.dataDir).forks.length;
      const bases = baseFiles(agent.dataDir);
      let answered = false;
      const pending = call("POST", "/instances/crash-src/fork", {
        name,
        target_state: "Running",
      }).finally(() => {
        answered = true;
      });

      // Poll tightly: some windows are tens of milliseconds long.
      const fork = await waitFor(
        () => {
          if (answered) return "answered" as const;
          const f = readJournal(agent.dataDir).forks[forksBefore];
          return f && point.hit(agent.dataDir, f, bases) ? f : undefined;
        },
        { timeoutMs: 60_000, intervalMs: 1, what: `the fork to reach "${point.name}"` },
      );
      if (fork === "answered") {
        throw new Error(
          `the fork was answered before "${point.name}": ${JSON.stringify(await pending)}`,
        );
      }
      await agent.kill("SIGKILL");
      const pidFileAtKill = existsSync(agentPaths(agent.dataDir).qemu.pidFile(fork.target));
      // The kill landed mid-fork: the journal on disk has the fork started and not finished.
      const atKill = readJournal(agent.dataDir).forks[forksBefore];
      expect(atKill?.done, `${point.name}: fork already done when killed`).toBe(false);
      const steps = atKill?.steps.join(",") ?? "";

      await agent.restart();
      await hostOnline(stack.db, stack.hostIds[0] ?? "");
      const r = await pending;
      const t0 = Date.now();

      // Either a Running fork (201) or an error and no fork.
      if (r.status === 201) {
        expect(r.body, point.name).toMatchObject({ name, state: "Running" });
      } else {
        expect(r.status, `${point.name}: ${JSON.stringify(r.body)}`).toBe(500);
        expect((await call("GET", `/instances/${name}`)).status, point.name).toBe(404);
      }
      await converged(`${point.name}: the host and the API to agree`);
      const convergeMs = Date.now() - t0;
      expect((await client.instances.get("crash-src")).state, point.name).toBe("Standby");

      // Executed at most once: one fork command for this target in the journal, settled.
      const journal = readJournal(agent.dataDir).forks.slice(forksBefore);
      expect(
        journal.map((f) => ({ target: f.target, done: f.done })),
        point.name,
      ).toEqual([{ target: fork.target, done: true }]);

      if (r.status === 201) {
        // The fork carries the source's memory: its count continues the source's.
        const c = await waitFor(
          async () => {
            const c = await counts(name);
            return c.length >= 2 ? c : undefined;
          },
          { timeoutMs: 20_000, what: `${name} to count` },
        );
        expect(c[0], point.name).toBe(last + 1);
        await client.instances.delete(name);
      }
      outcomes.push(
        `${point.name} [steps: ${steps}; fork's pid file: ${pidFileAtKill}] → ${r.status}, converged in ${convergeMs} ms`,
      );
      await converged(`${point.name}: clean after the fork's delete`);
    }
    console.log(`kill points:\n  ${outcomes.join("\n  ")}`);

    // The source survived every interrupted fork: a fork now works and continues its count.
    const ok = await call("POST", "/instances/crash-src/fork", {
      name: "crash-fork-final",
      target_state: "Running",
    });
    expect(ok.status, JSON.stringify(ok.body)).toBe(201);
    const c = await waitFor(
      async () => {
        const c = await counts("crash-fork-final");
        return c.length >= 2 ? c : undefined;
      },
      { timeoutMs: 20_000, what: "the final fork to count" },
    );
    expect(c[0]).toBe(last + 1);
    await converged("after the final fork");

    await client.instances.delete("crash-fork-final");
    await client.instances.delete("crash-src");
    expect(await divergence()).toEqual([]);
    expect(qemuProcesses(agent.dataDir)).toEqual([]);
    expect(instanceDirs(agent.dataDir)).toEqual([]);
  });
});
