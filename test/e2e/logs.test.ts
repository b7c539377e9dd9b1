import { beforeAll, describe, expect, it } from "vitest";
import { api, hypeman } from "../harness.ts";
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
    const stream = await client.instances.logs("log-1", { tail: 0, follow: true });
    const seen: string[] = [];
    const reading = (async () => {
      for await (const line of stream) {
        seen.push(line);
        if (line.endsWith("sim: Standby")) break;
      }
    })();
    await new Promise((r) => setTimeout(r, 300));
    await client.instances.standby("log-1");
    await Promise.race([
      reading,
      new Promise((_, reject) =>
        setTimeout(() => reject(new Error(`no Standby line; saw ${JSON.stringify(seen)}`)), 10_000),
      ),
    ]);
    expect(seen.at(-1)).toMatch(/sim: Standby$/);
    stream.controller.abort();
  });

  it("answers 404 for an unknown instance, 400 for bad parameters, 503 when the host is away", async () => {
    const call = api(stack.cp.url, stack.apiKey);
    expect((await call("GET", "/instances/nope/logs")).status).toBe(404);
    expect((await call("GET", "/instances/log-1/logs?tail=-1")).status).toBe(400);
    expect((await call("GET", "/instances/log-1/logs?source=kernel")).status).toBe(400);
    expect((await call("GET", "/instances/log-1/logs?follow=maybe")).status).toBe(400);
    await stack.agents[0]?.kill("SIGKILL");
    // The control plane notices the closed socket at once.
    let status = 0;
    for (let i = 0; i < 50 && status !== 503; i++) {
      status = (await call("GET", "/instances/log-1/logs")).status;
      if (status !== 503) await new Promise((r) => setTimeout(r, 100));
    }
    expect(status).toBe(503);
  });
});
