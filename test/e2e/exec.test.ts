import { beforeAll, describe, expect, it } from "vitest";
import { execOnce } from "../exec-client.ts";
import { api, hypeman } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

// Exec, stat and stats through the control plane and a real agent process over its WebSocket,
// against the sim's simulated guest agent (sim-guest.ts): the relay, the protocol and the
// checks. The QEMU files run the same against real guests.
describe("exec, stat and stats (sim guest)", () => {
  let stack: Stack;
  let client: ReturnType<typeof hypeman>;
  const run = (start: Record<string, unknown>, opts?: Parameters<typeof execOnce>[4]) =>
    execOnce(stack.cp.url, stack.apiKey, "ex-1", start, opts);

  beforeAll(async () => {
    stack = await startStack();
    client = hypeman(stack.cp.url, stack.apiKey);
    await client.instances.create({ name: "ex-1", image: "alpine", vcpus: 1, size: "256MB" });
    await client.instances.create({
      name: "ex-noagent",
      image: "alpine",
      vcpus: 1,
      size: "256MB",
      skip_guest_agent: true,
    });
    await client.instances.create({ name: "ex-stopped", image: "alpine", vcpus: 1, size: "256MB" });
    await client.instances.stop("ex-stopped");
  });

  it("runs a command: its output as binary frames, then its exit code", async () => {
    const r = await run({ command: ["echo", "hello", "world"] });
    expect(r.output.toString()).toBe("hello world\n");
    expect(r.exitCode).toBe(0);
    expect(r.closeCode).toBe(1000);
    expect((await run({ command: ["exit", "3"] })).exitCode).toBe(3);
    expect((await run({ command: ["env", "FOO"], env: { FOO: "bar" } })).output.toString()).toBe(
      "bar\n",
    );
  });

  it("pipes stdin through, and close_stdin ends it", async () => {
    const r = await run({ command: ["cat"] }, { stdin: ["one ", "two\n"], closeStdin: true });
    expect(r.output.toString()).toBe("one two\n");
    expect(r.exitCode).toBe(0);
  });

  it("ends a command at its timeout with exit code 124", async () => {
    const r = await run({ command: ["sleep", "30"], timeout: 1 });
    expect(r.exitCode).toBe(124);
  });

  it("reports a command that cannot start as Error: … and exit code 127", async () => {
    const r = await run({ command: ["no-such-program"] });
    expect(r.output.toString()).toMatch(/^Error: .*no-such-program.*\r\n$/);
    expect(r.exitCode).toBe(127);
  });

  it("answers a first message that is not the JSON start with an error", async () => {
    const r = await run("not json" as never);
    expect(r.texts.join("")).toMatch(/"error":"invalid JSON/);
    expect(r.exitCode).toBeUndefined();
  });

  it("refuses before the upgrade: 409 when not Running or without a guest agent, 404 unknown", async () => {
    await expect(execOnce(stack.cp.url, stack.apiKey, "ex-stopped", {})).rejects.toMatchObject({
      status: 409,
      body: expect.stringContaining("instance must be running (current state: Stopped)"),
    });
    await expect(execOnce(stack.cp.url, stack.apiKey, "ex-noagent", {})).rejects.toMatchObject({
      status: 409,
      body: expect.stringContaining("skip_guest_agent"),
    });
    await expect(execOnce(stack.cp.url, stack.apiKey, "nope", {})).rejects.toMatchObject({
      status: 404,
    });
    await expect(execOnce(stack.cp.url, "osk_wrong", "ex-1", {})).rejects.toMatchObject({
      status: 401,
    });
  });

  it("serves stat and stats to the official client", async () => {
    expect(await client.instances.stat("ex-1", { path: "/etc" })).toMatchObject({
      exists: true,
      is_dir: true,
      mode: 0o755,
    });
    expect(await client.instances.stat("ex-1", { path: "/missing" })).toEqual({ exists: false });
    const stats = await client.instances.stats("ex-1");
    expect(stats).toMatchObject({
      instance_name: "ex-1",
      allocated_vcpus: 1,
      allocated_memory_bytes: 256 * 1024 ** 2,
    });
    const call = api(stack.cp.url, stack.apiKey);
    expect((await call("GET", "/instances/ex-noagent/stat?path=/")).status).toBe(409);
    expect((await call("GET", "/instances/ex-stopped/stats")).status).toBe(409);
    expect((await call("GET", "/instances/ex-1/stat")).status).toBe(400);
  });

  it("opens a WebSocket with a single-use stream token in place of the API key (for browsers)", async () => {
    const issued = await api(stack.cp.url, stack.apiKey)("POST", "/auth/stream-token");
    expect(issued.status).toBe(201);
    const { token, expires_at } = issued.body as { token: string; expires_at: string };
    expect(Date.parse(expires_at) - Date.now()).toBeGreaterThan(30_000);
    const url = `${stack.cp.url}/instances/ex-1/exec?token=${encodeURIComponent(token)}`;
    const r = await execOnce(url, "", "", { command: ["echo", "browser"] });
    expect(r.output.toString()).toBe("browser\n");
    // Spent: the same token is refused, and so is one on any other route.
    await expect(execOnce(url, "", "", { command: ["true"] })).rejects.toMatchObject({
      status: 401,
    });
    const other = await api(stack.cp.url, stack.apiKey)("POST", "/auth/stream-token");
    const list = await fetch(
      `${stack.cp.url}/instances?token=${(other.body as { token: string }).token}`,
    );
    expect(list.status).toBe(401);
  });

  it("ends a running exec with a reason when the host's agent goes away", async () => {
    let killed: Promise<void> | undefined;
    // Output flowing: the stream is live end to end when the agent is killed.
    const r = await run(
      { command: ["yes", String(1024 ** 3)] },
      {
        onOutput: () => {
          killed ??= stack.agents[0]?.kill("SIGKILL");
        },
      },
    );
    await killed;
    expect(r.output.toString()).toMatch(/Error: the host disconnected\r\n$/);
    expect(r.exitCode).toBe(127);
    expect(r.closeCode).toBe(1011);
  });
});
