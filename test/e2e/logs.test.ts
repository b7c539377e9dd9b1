import { beforeAll, describe, expect, it } from "vitest";
import { api, hypeman, waitFor } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

// GET /instances/{id}/logs (SSE) through the official client, with real agent processes.
// The sim's console log is its state changes; the operations log is the agent's own.
describe("instance logs", () => {
  let stack: Stack;
  let client: ReturnType<typeof hypeman>;
  let id: string;
  beforeAll(async () => {
    stack = await startStack();
    client = hypeman(stack.cp.url, stack.apiKey);
    id = (
      await client.instances.create({ name: "log-1", image: "alpine", vcpus: 1, size: "256MB" })
    ).id;
    await client.instances.stop("log-1");
    await client.instances.start("log-1", {});
  });

  /** `p`, or an error naming `what` if it has not settled in 30 s (a hang, not a slow run). */
  const within = <T>(p: Promise<T>, what: string): Promise<T> => {
    let timer: NodeJS.Timeout | undefined;
    return Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no ${what} within 30 s`)), 30_000);
      }),
    ]).finally(() => clearTimeout(timer));
  };

  const collect = async (stream: AsyncIterable<string>) => {
    const lines: string[] = [];
    for await (const line of stream) lines.push(line);
    return lines;
  };

  it("returns the last `tail` lines of the console", async () => {
    const all = await collect(await client.instances.logs("log-1", { tail: 100 }));
    expect(all.map((l) => l.replace(/^\S+ /, ""))).toEqual([
      "sim: Running",
      "sim: Stopped",
      "sim: Running",
    ]);
    const last = await collect(await client.instances.logs(id, { tail: 2 }));
    expect(last).toEqual(all.slice(-2));
    expect(await collect(await client.instances.logs(id, { tail: 0 }))).toEqual([]);
  });

  it("returns the operations the host ran on the instance (source=hypeman)", async () => {
    const ops = await collect(await client.instances.logs("log-1", { source: "hypeman" }));
    const text = ops.map((l) => l.replace(/^\S+ /, "").replace(/ \(command .*\)$/, ""));
    expect(text).toEqual([
      "create started",
      "create ok",
      "stop started",
      "stop ok",
      "start started",
      "start ok",
    ]);
  });

  it("has no VMM log for the sim (source=vmm)", async () => {
    expect(await collect(await client.instances.logs("log-1", { source: "vmm" }))).toEqual([]);
  });

  it("follows: lines written after the request arrive on the open stream", async () => {
    // tail=1: the last line so far comes first, and once it has, the host is following the
    // file from where that line ends; what is written after must come on the same stream.
    const stream = await client.instances.logs("log-1", { tail: 1, follow: true });
    const lines = stream[Symbol.asyncIterator]();
    try {
      const last = await within(lines.next(), "the last line so far");
      expect(last.value).toMatch(/sim: Running$/);
      await client.instances.standby("log-1");
      const next = await within(lines.next(), "the line the standby wrote");
      expect(next).toMatchObject({ done: false, value: expect.stringMatching(/sim: Standby$/) });
    } finally {
      stream.controller.abort();
    }
  });

  it("answers 404 for an unknown instance, 400 for bad parameters, 503 when the host is away", async () => {
    const call = api(stack.cp.url, stack.apiKey);
    expect((await call("GET", "/instances/nope/logs")).status).toBe(404);
    expect((await call("GET", "/instances/log-1/logs?tail=-1")).status).toBe(400);
    expect((await call("GET", "/instances/log-1/logs?source=kernel")).status).toBe(400);
    expect((await call("GET", "/instances/log-1/logs?follow=maybe")).status).toBe(400);
    const agent = stack.agents[0];
    if (!agent) throw new Error("no agent");
    await agent.kill("SIGKILL");
    // The control plane notices the closed socket.
    const away = await waitFor(
      async () => {
        const r = await call("GET", "/instances/log-1/logs");
        return r.status === 503 ? r : undefined;
      },
      { timeoutMs: 30_000, what: "503 once the agent is gone" },
    );
    expect(away.body).toMatchObject({ code: "host_unavailable" });
  });
});
