// Log streams hold little memory however the guest writes and however slowly clients read:
// every stream is flow-controlled from the agent's file to the client's socket, and an agent's
// frames are bounded, so guest output can neither fill the control plane's memory nor cut the
// host's connection.
import { appendFileSync, readFileSync } from "node:fs";
import net from "node:net";
import { eq } from "drizzle-orm";
import { beforeAll, describe, expect, it } from "vitest";
import { hosts } from "../../control-plane/src/db/schema/index.ts";
import { agentPaths } from "../../host-agent/src/paths.ts";
import { api, waitFor } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

const MiB = 1024 * 1024;

/** The process's resident set and its peak, in bytes (Linux). */
function memory(pid: number): { rss: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = (field: string) =>
    Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)?.[1]);
  return { rss: kb("VmRSS") * 1024, peak: kb("VmHWM") * 1024 };
}

/** Opens a follow stream with a raw socket, takes the response's first bytes, then stops
 * reading: a client that never reads. */
function stalledFollower(url: string, apiKey: string, path: string): Promise<net.Socket> {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = net.connect(Number(u.port), u.hostname, () => {
      socket.write(
        `GET ${path} HTTP/1.1\r\nHost: ${u.host}\r\nAuthorization: Bearer ${apiKey}\r\nAccept: text/event-stream\r\n\r\n`,
      );
    });
    socket.once("error", reject);
    socket.once("data", (first) => {
      expect(first.toString()).toMatch(/^HTTP\/1\.1 200/);
      socket.pause();
      resolve(socket);
    });
  });
}

/** Reads a follow stream (tail=1) to its end marker, counting the lines after the first. */
function follower(url: string, apiKey: string, path: string, until: string) {
  let started: () => void = () => {};
  const following = new Promise<void>((r) => {
    started = r;
  });
  const done = (async () => {
    const res = await fetch(new URL(path, url), { headers: { authorization: `Bearer ${apiKey}` } });
    expect(res.status).toBe(200);
    const reader = (res.body as ReadableStream<Uint8Array>)
      .pipeThrough(new TextDecoderStream())
      .getReader();
    let buf = "";
    let lines = -1; // the tail's line is not counted
    let longest = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`stream ended before ${until}`);
      buf += value;
      for (let nl = buf.indexOf("\n\n"); nl >= 0; nl = buf.indexOf("\n\n")) {
        const event = buf.slice(0, nl);
        buf = buf.slice(nl + 2);
        const data = /^data: (.*)$/m.exec(event)?.[1];
        if (data === undefined) continue;
        const line = JSON.parse(data) as string;
        if (lines++ === -1) {
          started();
          continue;
        }
        longest = Math.max(longest, line.length);
        if (line === until) {
          await reader.cancel();
          return { lines, longest };
        }
      }
    }
  })();
  return { following, done };
}

describe("log stream limits", () => {
  let stack: Stack;
  let id: string;
  let consoleLog: string;

  beforeAll(async () => {
    stack = await startStack({ cpEnv: { HOST_GRACE_MS: "60000" } });
    const r = await api(stack.cp.url, stack.apiKey)("POST", "/instances", {
      name: "chatty",
      image: "alpine",
      vcpus: 1,
    });
    expect(r.status).toBe(201);
    id = (r.body as { id: string }).id;
    consoleLog = agentPaths(stack.agents[0]?.dataDir ?? "").sim.consoleLog(id);
  });

  it("ten followers that never read and 60 MB of guest output leave the control plane's memory bounded", async () => {
    const path = `/instances/${id}/logs?follow=true&tail=0`;
    const stalled = await Promise.all(
      Array.from({ length: 10 }, () => stalledFollower(stack.cp.url, stack.apiKey, path)),
    );
    const before = memory(stack.cp.pid);
    // A reader that keeps up sees all of it: by then the stalled ones had all of it on offer.
    appendFileSync(consoleLog, "mark 1\n");
    const reading = follower(
      stack.cp.url,
      stack.apiKey,
      path.replace("tail=0", "tail=1"),
      "the end",
    );
    await reading.following;
    const line = `${"x".repeat(1023)}\n`;
    for (let i = 0; i < 60; i++) appendFileSync(consoleLog, line.repeat(1024));
    appendFileSync(consoleLog, "the end\n");
    const read = await reading.done;
    expect(read.lines).toBe(60 * 1024 + 1);
    const after = memory(stack.cp.pid);
    const grew = after.peak - before.rss;
    console.log(
      `control plane: rss ${Math.round(before.rss / MiB)} MiB before, peak ${Math.round(after.peak / MiB)} MiB (10 stalled followers, 60 MiB written)`,
    );
    // Unbounded, each stalled follower would hold the 60 MiB (600 MiB in all).
    expect(grew).toBeLessThan(200 * MiB);
    for (const s of stalled) s.destroy();
  });

  it("long lines are cut into pieces, and guest output never disconnects its host", async () => {
    const [host] = await stack.db
      .select()
      .from(hosts)
      .where(eq(hosts.id, stack.hostIds[0] ?? ""));
    appendFileSync(consoleLog, "mark 2\n");
    const reading = follower(
      stack.cp.url,
      stack.apiKey,
      `/instances/${id}/logs?follow=true&tail=1`,
      "done",
    );
    await reading.following;
    // 500 lines of 40 KiB: unchunked, one 20 MB frame over the socket's 8 MiB limit.
    appendFileSync(consoleLog, `${"y".repeat(40 * 1024)}\n`.repeat(500));
    appendFileSync(consoleLog, "done\n");
    const read = await reading.done;
    expect(read.longest).toBeLessThanOrEqual(16 * 1024);
    expect(read.lines).toBeGreaterThanOrEqual(500 * 3);
    const [now] = await stack.db
      .select()
      .from(hosts)
      .where(eq(hosts.id, stack.hostIds[0] ?? ""));
    expect(now?.status).toBe("online");
    // Still the same connection.
    expect(now?.connectedAt?.getTime()).toBe(host?.connectedAt?.getTime());
    await waitFor(
      async () => (await api(stack.cp.url, stack.apiKey)("GET", `/instances/${id}`)).status === 200,
    );
  });
});
