import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TEST_IMAGE } from "../../scripts/oci-image.ts";
import { ensureVmAssets } from "../../scripts/vm-assets.ts";
import { api, consoleCounts, consoleLines, hypeman, waitFor } from "../harness.ts";
import { killStackGuests, qemuAgentEnv, type Stack, startStack } from "./env.ts";

// Real guests through the public API: a host agent running the QEMU driver (TCG here), driven
// by the official client. Guests run the busybox test image (scripts/oci-image.ts) on overlayfs;
// they count on the serial console, so the logs show whether a fork carried the source's memory.
describe("real VMs (QEMU) through the API", { timeout: 300_000 }, () => {
  let stack: Stack;
  let client: ReturnType<typeof hypeman>;
  beforeAll(async () => {
    await ensureVmAssets();
    stack = await startStack({
      // Guests under TCG on a loaded 2-core machine boot in tens of seconds: requests wait for
      // them (these tests are about what a fork carries over, not how fast).
      cpEnv: { COMMAND_TIMEOUT_MS: "120000" },
      agents: [qemuAgentEnv()],
    });
    client = hypeman(stack.cp.url, stack.apiKey);
  }, 300_000);

  afterAll(() => killStackGuests(stack));

  const logLines = (name: string) => consoleLines(client, name);
  const counts = (name: string) => consoleCounts(client, name);
  /** The FILES lines: what the guest saw in /root, oldest first. */
  const listings = async (name: string) =>
    (await logLines(name)).flatMap((l) => {
      const m = /^FILES (.*)$/.exec(l.trim());
      return m ? [(m[1] ?? "").split(" ").filter(Boolean)] : [];
    });

  it("lists the imported image, and refuses a create naming one no host has", async () => {
    const images = await client.images.list();
    expect(images).toEqual([
      expect.objectContaining({
        name: TEST_IMAGE,
        status: "ready",
        digest: expect.stringMatching(/^sha256:[0-9a-f]{64}$/),
        cmd: ["/usr/bin/count"],
      }),
    ]);
    const one = await client.images.get(TEST_IMAGE); // the client encodes the slashes
    expect(one.digest).toBe(images[0]?.digest);
    const call = api(stack.cp.url, stack.apiKey);
    expect((await call("GET", `/images/${encodeURIComponent("nope:1")}`)).status).toBe(404);
    const missing = await call("POST", "/instances", { name: "no-img", image: "nope:1" });
    expect(missing.status).toBe(404);
    expect(missing.body).toMatchObject({ code: "not_found" });
    expect((await call("GET", "/instances/no-img")).status).toBe(404);
  });

  it("forks a guest from Standby and from Running: the forks continue the source's count", async () => {
    // Each second: a count, a file named after the hostname in /root (the image's WorkingDir),
    // and what /root holds. A fork gets its own hostname and its own copy of the disk.
    const program = [
      'echo "PWD $(pwd) GREETING $GREETING"',
      "n=0",
      "while :; do",
      '  echo "OFFSHOOT-COUNT $n"',
      '  echo x > "$(hostname)"',
      '  echo "FILES $(ls | tr "\\n" " ")"',
      "  n=$((n + 1))",
      "  sleep 1",
      "done",
    ].join("\n");
    const vm = await client.instances.create({
      name: "vm-1",
      image: TEST_IMAGE,
      size: "256MB",
      vcpus: 1,
      env: { GREETING: "hello from env" },
      cmd: ["sh", "-c", program],
    });
    expect(vm.state).toBe("Running");
    expect(vm.hypervisor).toBe("qemu");
    await waitFor(async () => (await counts("vm-1")).length >= 3, {
      timeoutMs: 20_000,
      what: "the guest to count",
    });
    // The image's WorkingDir and the instance's env reached the program.
    expect(await logLines("vm-1")).toContainEqual(
      expect.stringContaining("PWD /root GREETING hello from env"),
    );
    expect((await listings("vm-1")).at(-1)).toEqual(["vm-1"]);

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
    // The fork took its own hostname on restore; its disk holds the source's file and its own.
    await waitFor(async () => (await listings("vm-1-a")).at(-1)?.includes("vm-1-a"), {
      timeoutMs: 10_000,
      what: "the fork to write under its own hostname",
    });
    expect((await listings("vm-1-a")).at(-1)).toEqual(["vm-1", "vm-1-a"]);

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

    // What the forks wrote after forking is on their disks only.
    await waitFor(async () => (await listings("vm-1-b")).at(-1)?.includes("vm-1-b"), {
      timeoutMs: 10_000,
      what: "the hot fork to write under its own hostname",
    });
    const sourceSaw = (await listings("vm-1")).flat();
    expect(sourceSaw).not.toContain("vm-1-a");
    expect(sourceSaw).not.toContain("vm-1-b");
    expect((await listings("vm-1-a")).flat()).not.toContain("vm-1-b");

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

  it("reports the guest program's exit: code and message, as Hypeman words them (OOM too)", async () => {
    const cases = [
      { name: "exit-3", cmd: ["sh", "-c", "exit 3"], code: 3, message: "exited with code 3" },
      { name: "exit-127", cmd: ["no-such-program"], code: 127, message: "command not found" },
      {
        name: "exit-kill",
        cmd: ["sh", "-c", "kill -9 $$"],
        code: 137,
        message: "killed by signal 9 (SIGKILL)",
      },
      {
        // tail keeps the last line of an endless one in memory: the OOM killer ends it.
        name: "exit-oom",
        cmd: ["tail", "/dev/zero"],
        code: 137,
        message: "killed by signal 9 (SIGKILL) - OOM",
      },
    ];
    for (const c of cases) {
      await client.instances.create({
        name: c.name,
        image: TEST_IMAGE,
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

  it("forks one Standby source five times at once, then to Stopped and Standby; a Stopped source's fork boots", async () => {
    await client.instances.create({ name: "many", image: TEST_IMAGE, size: "128MB", vcpus: 1 });
    await waitFor(async () => (await counts("many")).length >= 2, {
      timeoutMs: 20_000,
      what: "the source to count",
    });
    await client.instances.standby("many");
    const last = (await counts("many")).at(-1) ?? -1;
    const names = [1, 2, 3, 4, 5].map((i) => `many-${i}`);
    const forks = await Promise.all(
      names.map((name) => client.instances.fork("many", { name, target_state: "Running" })),
    );
    expect(forks.map((f) => f.state)).toEqual(names.map(() => "Running"));
    expect(new Set(forks.map((f) => f.network?.mac)).size).toBe(5);
    for (const name of names) {
      const first = await waitFor(async () => (await counts(name))[0], {
        timeoutMs: 20_000,
        what: `${name} to count`,
      });
      expect(first, name).toBe(last + 1);
    }
    expect((await client.instances.get("many")).state).toBe("Standby");
    for (const name of names) await client.instances.delete(name);

    // The other target states from the same snapshot: Stopped (disk only), Standby (a snapshot
    // of its own that resumes where the source was).
    const stopped = await client.instances.fork("many", {
      name: "many-s",
      target_state: "Stopped",
    });
    expect(stopped.state).toBe("Stopped");
    const sb = await client.instances.fork("many", { name: "many-b", target_state: "Standby" });
    expect(sb.state).toBe("Standby");
    expect((await client.instances.restore("many-b")).state).toBe("Running");
    const resumed = await waitFor(async () => (await counts("many-b"))[0], {
      timeoutMs: 20_000,
      what: "the Standby fork to count once restored",
    });
    expect(resumed).toBe(last + 1);
    // A follower of its console ends once the guest has powered off; the stop reports how the
    // program ended (the guest's init SIGTERMs it: 143).
    const following = (async () => {
      const lines: string[] = [];
      for await (const line of await client.instances.logs("many-b", { follow: true, tail: 1 }))
        lines.push(line);
      return lines;
    })();
    const halted = await client.instances.stop("many-b");
    expect(halted).toMatchObject({
      state: "Stopped",
      exit_code: 143,
      exit_message: "killed by signal 15 (SIGTERM)",
    });
    const followed = await following;
    expect(followed.join("\n")).toMatch(/OFFSHOOT-INIT \{"event":"exit","code":143/);
    // A fork from a Stopped source boots: its program starts over (a fresh count).
    const cold = await client.instances.fork("many-b", { name: "many-c", target_state: "Running" });
    expect(cold.state).toBe("Running");
    const fresh = await waitFor(async () => (await counts("many-c"))[0], {
      timeoutMs: 20_000,
      what: "the fork of a Stopped source to count",
    });
    expect(fresh).toBe(0);
    for (const name of ["many-s", "many-b", "many-c", "many"]) await client.instances.delete(name);
  });
});
