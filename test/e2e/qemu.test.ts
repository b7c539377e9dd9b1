import { readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { agentPaths } from "../../host-agent/src/paths.ts";
import { ensureVmAssets } from "../../scripts/vm-assets.ts";
import { hypeman, REPO_ROOT, waitFor } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

// Real guests through the public API: a host agent running the QEMU driver (TCG here), driven
// by the official client. The guest counts on its serial console, so the logs show whether a
// fork carried the source's memory.
describe("real VMs (QEMU) through the API", { timeout: 120_000 }, () => {
  let stack: Stack;
  let client: ReturnType<typeof hypeman>;
  beforeAll(async () => {
    await ensureVmAssets();
    stack = await startStack({
      agents: [
        {
          AGENT_DRIVER: "qemu",
          AGENT_ACCEL: "tcg",
          AGENT_VM_ASSETS: path.join(REPO_ROOT, ".data/vm-assets"),
          AGENT_VCPUS: "4",
          AGENT_MEMORY: "4GB",
        },
      ],
    });
    client = hypeman(stack.cp.url, stack.apiKey);
  }, 300_000);

  // Guests outlive their agent by design; whatever a failed test left running goes here.
  afterAll(() => {
    for (const agent of stack?.agents ?? []) {
      const { qemu } = agentPaths(agent.dataDir);
      const dirs = readdirSync(qemu.instancesDir, { withFileTypes: true });
      for (const id of dirs.filter((e) => e.isDirectory())) {
        try {
          const pid = Number(readFileSync(qemu.pidFile(id.name), "utf8"));
          if (pid > 0) process.kill(pid, "SIGKILL");
        } catch {
          // no pid file or no such process: nothing running for this instance
        }
      }
    }
  });

  const counts = async (name: string) => {
    const lines: string[] = [];
    for await (const line of await client.instances.logs(name, { tail: 10_000 })) lines.push(line);
    return lines.flatMap((l) => {
      const m = /OFFSHOOT-COUNT (\d+)/.exec(l);
      return m ? [Number(m[1])] : [];
    });
  };

  it("forks a guest from Standby and from Running: the forks continue the source's count", async () => {
    const vm = await client.instances.create({
      name: "vm-1",
      image: "busybox",
      size: "256MB",
      vcpus: 1,
    });
    expect(vm.state).toBe("Running");
    expect(vm.hypervisor).toBe("qemu");
    await waitFor(async () => (await counts("vm-1")).length >= 3, {
      timeoutMs: 20_000,
      what: "the guest to count",
    });

    // From Standby: the fork's first count follows the source's last one.
    expect((await client.instances.standby("vm-1")).state).toBe("Standby");
    const before = (await counts("vm-1")).at(-1) ?? -1;
    const fork = await client.instances.fork("vm-1", { name: "vm-1-a", target_state: "Running" });
    expect(fork.state).toBe("Running");
    const forkCounts = await waitFor(
      async () => {
        const c = await counts("vm-1-a");
        return c.length >= 2 ? c : undefined;
      },
      { timeoutMs: 20_000, what: "the fork to count" },
    );
    expect(forkCounts[0]).toBe(before + 1);

    // From Running: the source is put in standby, forked and restored; both go on counting.
    expect((await client.instances.restore("vm-1")).state).toBe("Running");
    const hot = await client.instances.fork("vm-1", { name: "vm-1-b", from_running: true });
    expect(hot.state).toBe("Running");
    expect((await client.instances.get("vm-1")).state).toBe("Running");
    const hotCounts = await waitFor(
      async () => {
        const c = await counts("vm-1-b");
        return c.length >= 2 ? c : undefined;
      },
      { timeoutMs: 20_000, what: "the hot fork to count" },
    );
    // Not from 0: it carries the source's memory from the moment of the hot snapshot.
    expect(hotCounts[0]).toBeGreaterThanOrEqual(before + 1);

    // Deleting the source leaves its forks running.
    await client.instances.delete("vm-1");
    const last = (await counts("vm-1-a")).at(-1) ?? 0;
    await waitFor(async () => ((await counts("vm-1-a")).at(-1) ?? 0) > last, {
      timeoutMs: 10_000,
      what: "the fork to keep counting after its source was deleted",
    });
    expect((await client.instances.get("vm-1-a")).state).toBe("Running");
    expect((await client.instances.get("vm-1-b")).state).toBe("Running");
    await client.instances.delete("vm-1-a");
    await client.instances.delete("vm-1-b");
  });

  it("reports the guest program's exit: code and message, as Hypeman words them", async () => {
    const cases = [
      { name: "exit-3", cmd: ["sh", "-c", "exit 3"], code: 3, message: "exited with code 3" },
      { name: "exit-127", cmd: ["no-such-program"], code: 127, message: "command not found" },
      {
        name: "exit-kill",
        cmd: ["sh", "-c", "kill -9 $$"],
        code: 137,
        message: "killed by signal 9 (SIGKILL)",
      },
    ];
    for (const c of cases) {
      await client.instances.create({
        name: c.name,
        image: "busybox",
        size: "128MB",
        vcpus: 1,
        cmd: c.cmd,
      });
      const waited = await client.instances.wait(c.name, { state: "Stopped", timeout: "30s" });
      expect(waited.state, c.name).toBe("Stopped");
      const inst = await client.instances.get(c.name);
      expect({ code: inst.exit_code, message: inst.exit_message }, c.name).toEqual({
        code: c.code,
        message: c.message,
      });
      await client.instances.delete(c.name);
    }
  });
});
