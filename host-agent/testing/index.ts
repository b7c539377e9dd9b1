// What the agent's tests share: temp dirs, bounded polling, instance specs, and a tiny control
// plane built on `ws` that records everything the agent sends. Outside src/, which must not
// import test code (test/imports.test.ts).
import { mkdtemp, rm } from "node:fs/promises";
import type { IncomingMessage } from "node:http";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import {
  AgentMessage,
  type Command,
  encode,
  type InstanceSpec,
  type Operation,
  PROTOCOL_VERSION,
} from "@offshoot/shared";
import { onTestFinished } from "vitest";
import { type WebSocket, WebSocketServer } from "ws";
import type { AgentConfig, SimConfig } from "../src/config.ts";
import type { OpContext } from "../src/drivers/driver.ts";
import type { Logger, LogLevel } from "../src/log.ts";

/** A fresh directory under the OS temp dir, removed when the test finishes. */
export async function tempDir(): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), "offshoot-agent-"));
  onTestFinished(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** Polls until `probe` returns something other than undefined/false, or fails after timeoutMs. */
export async function waitFor<T>(
  what: string,
  probe: () => T | undefined | false | Promise<T | undefined | false>,
  timeoutMs = 5_000,
  pollMs = 10,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, pollMs));
  }
}

export function spec(id: string, overrides: Partial<InstanceSpec> = {}): InstanceSpec {
  return {
    id,
    name: `name-${id}`,
    image: "docker.io/library/alpine:latest",
    image_digest: null,
    hypervisor: "cloud-hypervisor",
    vcpus: 1,
    memory_bytes: 256 * 1024 ** 2,
    hotplug_bytes: 0,
    overlay_bytes: 1024 ** 3,
    disk_io_bps: null,
    env: {},
    entrypoint: null,
    cmd: null,
    network: {
      enabled: false,
      mac: null,
      ip: null,
      subnet: null,
      bandwidth_download_bps: null,
      bandwidth_upload_bps: null,
    },
    volumes: [],
    skip_guest_agent: false,
    ...overrides,
  };
}

export function command(id: string, op: Operation): Command {
  return { v: PROTOCOL_VERSION, type: "command", id, op };
}

export const SIM_DEFAULTS: SimConfig = { latencyMs: 0, fail: {}, execLog: true };

export function agentConfig(
  dataDir: string,
  url: string,
  sim: Partial<SimConfig> = {},
): AgentConfig {
  return {
    connectUrls: [url],
    hostToken: "test-token",
    dataDir,
    hostName: "test-host",
    driver: "sim",
    capacity: { vcpus: 8, memory_bytes: 16 * 1024 ** 3 },
    sim: { ...SIM_DEFAULTS, ...sim },
    pulls: {
      maxLayerBytes: 8 * 1024 ** 3,
      idleTimeoutMs: 30_000,
      insecure: [],
      concurrency: 2,
      cacheBytes: 50 * 1024 ** 3,
      rootfsFormat: "ext4",
    },
    qemu: {
      accel: "tcg",
      assetsDir: "/nonexistent",
      images: [],
      netns: null,
      launchConcurrency: 2,
    },
  };
}

/** Step records, for driver tests that run without a journal. */
export function recordingContext(commandId: string): OpContext & { recorded: string[] } {
  const recorded: string[] = [];
  return { commandId, recorded, steps: { record: async (step) => void recorded.push(step) } };
}

export interface LogLine {
  level: LogLevel;
  msg: string;
  [field: string]: unknown;
}

export function memoryLogger(): { log: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  return { lines, log: (level, msg, fields = {}) => void lines.push({ level, msg, ...fields }) };
}

export interface AgentSession {
  readonly socket: WebSocket;
  readonly request: IncomingMessage;
  readonly received: AgentMessage[];
  readonly closed: Promise<{ code: number; reason: string }>;
  send(msg: unknown): void;
  welcome(hostId?: string, heartbeatMs?: number): void;
  command(cmd: Command): void;
  /** The next message of `type` not yet taken by this helper. */
  next<T extends AgentMessage["type"]>(
    type: T,
    match?: (m: Extract<AgentMessage, { type: T }>) => boolean,
    timeoutMs?: number,
  ): Promise<Extract<AgentMessage, { type: T }>>;
}

/** Plays the control plane: accepts agents on /agent/v1/connect and records their messages. */
export async function fakeControlPlane(
  options: {
    autoPong?: boolean;
    onConnection?: (session: AgentSession) => void;
    /** Refuse every upgrade with this HTTP status. */
    rejectUpgrade?: number;
  } = {},
) {
  let upgradesRefused = 0;
  const reject = options.rejectUpgrade;
  const wss = new WebSocketServer({
    port: 0,
    host: "127.0.0.1",
    autoPong: options.autoPong ?? true,
    ...(reject && {
      verifyClient: (_info: unknown, done: (ok: boolean, status?: number) => void) => {
        upgradesRefused++;
        done(false, reject);
      },
    }),
  });
  await new Promise<void>((resolve) => wss.once("listening", resolve));
  const sessions: AgentSession[] = [];
  wss.on("connection", (socket, request) => {
    const received: AgentMessage[] = [];
    const taken = new Set<AgentMessage>();
    socket.on("message", (data) => {
      received.push(AgentMessage.parse(JSON.parse(data.toString())));
    });
    const closed = new Promise<{ code: number; reason: string }>((resolve) =>
      socket.on("close", (code, reason) => resolve({ code, reason: reason.toString() })),
    );
    const next = <T extends AgentMessage["type"]>(
      type: T,
      match?: (m: Extract<AgentMessage, { type: T }>) => boolean,
      timeoutMs?: number,
    ) => {
      const isType = (x: AgentMessage): x is Extract<AgentMessage, { type: T }> => x.type === type;
      return waitFor(
        `a ${type} message`,
        () => {
          for (const x of received) {
            if (taken.has(x) || !isType(x) || !(match?.(x) ?? true)) continue;
            taken.add(x);
            return x;
          }
          return undefined;
        },
        timeoutMs,
      );
    };
    const session: AgentSession = {
      socket,
      request,
      received,
      closed,
      next,
      send: (msg) => socket.send(JSON.stringify(msg)),
      welcome: (hostId = "host-1", heartbeatMs = 1_000) =>
        socket.send(
          encode({
            v: PROTOCOL_VERSION,
            type: "welcome",
            host_id: hostId,
            heartbeat_ms: heartbeatMs,
          }),
        ),
      command: (cmd) => socket.send(encode(cmd)),
    };
    sessions.push(session);
    options.onConnection?.(session);
  });
  const port = (wss.address() as AddressInfo).port;
  const close = async () => {
    for (const client of wss.clients) client.terminate();
    await new Promise<void>((resolve) => wss.close(() => resolve()));
  };
  onTestFinished(close);
  return {
    url: `ws://127.0.0.1:${port}/agent/v1/connect`,
    baseUrl: `http://127.0.0.1:${port}`,
    sessions,
    upgradesRefused: () => upgradesRefused,
    /** Waits for the n-th connection (1-based). */
    session: (n: number, timeoutMs?: number) =>
      waitFor(`connection #${n}`, () => sessions[n - 1], timeoutMs),
    close,
  };
}
