import { appendFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import {
  AGENT_LIMITS,
  type InstanceState,
  type LogChunk,
  LogChunk as LogChunkSchema,
  type ObservedInstance,
  PROTOCOL_VERSION,
} from "@offshoot/shared";
import { describe, expect, it } from "vitest";
import { tempDir, waitFor } from "../testing/index.ts";
import type { Driver } from "./drivers/driver.ts";
import { LogStreams, MAX_LOG_STREAMS } from "./logs.ts";
import { agentPaths } from "./paths.ts";

/** A driver with one instance whose console is `file`, in the state the test sets. */
function oneInstance(file: string) {
  let state: InstanceState | null = "Running";
  const driver = {
    get: async (id: string): Promise<ObservedInstance | null> =>
      id === "i1" && state ? { id, state, has_snapshot: false } : null,
    logFile: (id: string, source: string) => (id === "i1" && source === "app" ? file : undefined),
  } as unknown as Driver;
  return { driver, setState: (s: InstanceState | null) => (state = s) };
}

async function setup() {
  const dir = await tempDir();
  const file = path.join(dir, "console.log");
  writeFileSync(file, "");
  const { driver, setState } = oneInstance(file);
  const streams = new LogStreams(driver, agentPaths(dir));
  const sent: LogChunk[] = [];
  const open = (id: string, opts: { tail?: number; follow?: boolean } = {}) =>
    streams.open(
      {
        v: PROTOCOL_VERSION,
        type: "logs",
        stream_id: id,
        instance_id: "i1",
        source: "app",
        tail: opts.tail ?? 0,
        follow: opts.follow ?? true,
      },
      (c) => sent.push(c),
    );
  const chunksOf = (id: string) => sent.filter((c) => c.stream_id === id);
  const done = (id: string) => chunksOf(id).find((c) => c.done);
  /** Opens a follower and waits until it follows (it has sent a first line written after it). */
  const following = async (id: string) => {
    // tail=1: the line is sent whether it lands before the stream reads the file or after.
    open(id, { tail: 1 });
    appendFileSync(file, "start\n");
    await waitFor("the follower to start", () =>
      chunksOf(id).some((c) => c.lines.includes("start")),
    );
    streams.ack(id, 1);
  };
  return { file, streams, sent, open, following, chunksOf, done, setState };
}

describe("log streams", () => {
  it("send at most the window ahead of the reader's acks, whatever the guest writes", async () => {
    const t = await setup();
    await t.following("s1");
    const before = t.chunksOf("s1").length;
    // 8 MiB of output: sixteen times what the window may carry.
    const line = `${"x".repeat(1023)}\n`;
    appendFileSync(t.file, line.repeat(8 * 1024));
    await waitFor(
      "the window to fill",
      () => t.chunksOf("s1").length === before + AGENT_LIMITS.logWindow,
    );
    // Nothing more goes out without an ack: the next chunk follows the ack, one for one.
    t.streams.ack("s1", 1);
    await waitFor(
      "one more chunk",
      () => t.chunksOf("s1").length === before + AGENT_LIMITS.logWindow + 1,
    );
    // A reader that keeps up gets everything, in order.
    appendFileSync(t.file, "tail\n");
    await waitFor("every line", () => {
      t.streams.ack("s1", AGENT_LIMITS.logWindow);
      return t.chunksOf("s1").some((c) => c.lines.includes("tail"));
    });
    const lines = t.chunksOf("s1").flatMap((c) => c.lines);
    expect(lines).toHaveLength(1 + 8 * 1024 + 1);
    // Every chunk is a valid protocol message (its bounds included).
    for (const c of t.chunksOf("s1")) expect(LogChunkSchema.safeParse(c).success).toBe(true);
    t.streams.cancel("s1");
    await waitFor("the stream to end", () => t.done("s1"));
  });

  it("cuts long lines and a line that never ends into pieces within the protocol's bounds", async () => {
    const t = await setup();
    await t.following("s2");
    // 500 lines of 40 KiB each (one frame of 20 MB unchunked), then a 100 KiB line with no end.
    appendFileSync(t.file, `${"a".repeat(40 * 1024)}\n`.repeat(500));
    appendFileSync(t.file, "b".repeat(100 * 1024));
    // Every line is cut to at most logLineChars; a line may also be cut where a read ended.
    const text = () =>
      t
        .chunksOf("s2")
        .flatMap((c) => c.lines)
        .slice(1);
    await waitFor(
      "every piece",
      () => {
        t.streams.ack("s2", AGENT_LIMITS.logWindow);
        const lines = text();
        const bs = lines.filter((l) => l.startsWith("b")).join("").length;
        return bs >= 100 * 1024 - AGENT_LIMITS.logLineChars;
      },
      20_000,
    );
    const chunks = t.chunksOf("s2");
    for (const c of chunks) {
      expect(LogChunkSchema.safeParse(c).success).toBe(true);
      expect(JSON.stringify(c).length).toBeLessThan(AGENT_LIMITS.frameBytes / 8);
    }
    const lines = text();
    expect(Math.max(...lines.map((l) => l.length))).toBeLessThanOrEqual(AGENT_LIMITS.logLineChars);
    const as = lines.filter((l) => !l.startsWith("b"));
    expect(as.join("")).toBe("a".repeat(40 * 1024 * 500));
    expect(lines.slice(as.length).every((l) => /^b+$/.test(l))).toBe(true);
    t.streams.cancel("s2");
  });

  it("a follower of a guest's console ends once the guest is Stopped and all was sent", async () => {
    const t = await setup();
    appendFileSync(t.file, "one\ntwo\n");
    t.open("s3", { tail: 10 });
    await waitFor("the tail", () => t.chunksOf("s3").some((c) => c.lines.includes("two")));
    appendFileSync(t.file, "exit 0\n");
    t.setState("Stopped");
    const end = await waitFor("the stream to end", () => t.done("s3"));
    expect(end.error).toBeUndefined();
    expect(t.chunksOf("s3").flatMap((c) => c.lines)).toEqual(["one", "two", "exit 0"]);
  });

  it("refuses streams beyond its limit with a reason", async () => {
    const t = await setup();
    for (let i = 0; i < MAX_LOG_STREAMS; i++) t.open(`m${i}`);
    t.open("one-too-many");
    const end = await waitFor("the refusal", () => t.done("one-too-many"));
    expect(end.error?.code).toBe("insufficient_resources");
    t.streams.cancelAll();
    await waitFor("all to end", () => t.sent.filter((c) => c.done).length === MAX_LOG_STREAMS + 1);
  });
});
