import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { checkSocketPath, QmpClient, QmpClosedError, QmpCommandError } from "./qmp.ts";

interface FakeQmp {
  socketPath: string;
  /** Every command the fake received, in order. */
  received: Array<{ execute: string; arguments?: unknown; id?: unknown }>;
  /** Sends a line to the connected client. */
  send(msg: unknown): void;
  /** Drops the client connection. */
  hangUp(): void;
  close(): Promise<void>;
}

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** Answers like QEMU 7.2: greeting, then one reply per command (with its id), in order. */
async function fakeQmp(
  answer: (cmd: { execute: string; arguments?: unknown }) => unknown,
): Promise<FakeQmp> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "qmp-"));
  const socketPath = path.join(dir, "qmp.sock");
  const received: FakeQmp["received"] = [];
  let client: net.Socket | undefined;
  const server = net.createServer((sock) => {
    client = sock;
    sock.write(
      `${JSON.stringify({
        QMP: {
          version: { qemu: { micro: 22, minor: 2, major: 7 }, package: "fake" },
          capabilities: ["oob"],
        },
      })}\r\n`,
    );
    let buf = "";
    let writes = Promise.resolve();
    sock.on("data", (d) => {
      buf += d.toString();
      for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
        const cmd = JSON.parse(buf.slice(0, nl)) as FakeQmp["received"][number];
        buf = buf.slice(nl + 1);
        received.push(cmd);
        const reply = answer(cmd);
        if (reply === undefined) continue;
        // Chunk boundaries must not matter: each reply goes out in two writes, 5 ms apart.
        const text = `${JSON.stringify({ ...(reply as object), id: cmd.id })}\r\n`;
        writes = writes.then(async () => {
          sock.write(text.slice(0, 7));
          await new Promise((r) => setTimeout(r, 5));
          sock.write(text.slice(7));
        });
      }
    });
  });
  await new Promise<void>((r) => server.listen(socketPath, r));
  const fake: FakeQmp = {
    socketPath,
    received,
    send: (msg) => client?.write(`${JSON.stringify(msg)}\r\n`),
    hangUp: () => client?.destroy(),
    close: async () => {
      client?.destroy();
      await new Promise<void>((r) => server.close(() => r()));
      rmSync(dir, { recursive: true, force: true });
    },
  };
  cleanups.push(fake.close);
  return fake;
}

describe("QmpClient", () => {
  it("negotiates capabilities, correlates replies by id, and types errors", async () => {
    const fake = await fakeQmp((cmd) => {
      if (cmd.execute === "qmp_capabilities") return { return: {} };
      if (cmd.execute === "query-status") return { return: { status: "running", running: true } };
      if (cmd.execute === "echo") return { return: cmd.arguments };
      return {
        error: { class: "CommandNotFound", desc: `The command ${cmd.execute} has not been found` },
      };
    });
    const qmp = await QmpClient.connect(fake.socketPath);
    cleanups.push(() => qmp.close());
    expect(qmp.greeting?.version.qemu.major).toBe(7);
    expect(fake.received[0]?.execute).toBe("qmp_capabilities");

    const [status, echoed] = await Promise.all([
      qmp.execute<{ status: string }>("query-status"),
      qmp.execute("echo", { n: 42 }),
    ]);
    expect(status.status).toBe("running");
    expect(echoed).toEqual({ n: 42 });
    const ids = fake.received.map((c) => c.id);
    expect(new Set(ids).size).toBe(ids.length);

    const err = await qmp.execute("nope").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpCommandError);
    expect(err).toMatchObject({
      command: "nope",
      qmpClass: "CommandNotFound",
      desc: "The command nope has not been found",
    });
  });

  it("delivers events to subscribers until they unsubscribe", async () => {
    const fake = await fakeQmp(() => ({ return: {} }));
    const qmp = await QmpClient.connect(fake.socketPath);
    cleanups.push(() => qmp.close());
    const seen: string[] = [];
    const off = qmp.onEvent((e) => seen.push(e.event));
    const stop = qmp.waitForEvent("STOP", 2_000);
    const ts = { seconds: 1, microseconds: 2 };
    fake.send({ event: "STOP", timestamp: ts });
    expect((await stop).event).toBe("STOP");
    off();
    fake.send({ event: "RESUME", timestamp: ts });
    // A command round trip orders after the RESUME line on the same stream.
    await qmp.execute("query-status");
    expect(seen).toEqual(["STOP"]);
  });

  it("rejects pending commands when the connection drops", async () => {
    const fake = await fakeQmp((cmd) =>
      cmd.execute === "qmp_capabilities" ? { return: {} } : undefined,
    );
    const qmp = await QmpClient.connect(fake.socketPath);
    // The fake never answers "stop": the connection drops while it is pending.
    const pending = qmp.execute("stop");
    fake.hangUp();
    await expect(pending).rejects.toBeInstanceOf(QmpClosedError);
    await qmp.closed;
    expect(qmp.isClosed).toBe(true);
    await expect(qmp.execute("cont")).rejects.toBeInstanceOf(QmpClosedError);
  });

  it("retries while the socket does not exist yet, and gives up after the timeout", async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "qmp-"));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const started = Date.now();
    await expect(
      QmpClient.connect(path.join(dir, "missing.sock"), { timeoutMs: 300 }),
    ).rejects.toThrow(/ENOENT/);
    expect(Date.now() - started).toBeGreaterThanOrEqual(300);
    expect(Date.now() - started).toBeLessThan(3_000);
  });

  it("refuses socket paths that do not fit sun_path", () => {
    expect(() => checkSocketPath(`/tmp/${"x".repeat(120)}`)).toThrow(/107 bytes/);
    expect(checkSocketPath("/tmp/q.sock")).toBe("/tmp/q.sock");
  });
});
