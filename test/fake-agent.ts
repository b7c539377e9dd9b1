// A hand-driven agent for protocol tests: a real WebSocket to the control plane with a host's
// token, whose messages the test writes itself — what a misbehaving or hostile host could send.
import {
  AGENT_PATH,
  type DriverCapabilities,
  type Hello,
  PROTOCOL_VERSION,
  type ServerMessage,
} from "@offshoot/shared";
import WebSocket from "ws";
import { waitFor } from "./harness.ts";

/** What a fake agent's hello offers unless a test says otherwise. */
export const FAKE_CAPABILITIES = {
  hypervisors: ["qemu"],
  fork_from_stopped: true,
  fork_from_standby: true,
  standby: true,
  hotplug_memory: false,
  disk_io_limit: false,
  volumes: false,
  images: false,
} satisfies Partial<DriverCapabilities>;

export interface FakeAgent {
  /** Everything the control plane sent, parsed, in order. */
  readonly received: ServerMessage[];
  /** Sends a message as is (an object is JSON-encoded). */
  send(msg: object | string): void;
  /** A hello with sensible defaults; `over` replaces any field. */
  hello(over?: Partial<Record<keyof Hello, unknown>>): void;
  /** Waits for a message from the control plane matching `pred` (one already received counts). */
  next<T extends ServerMessage>(pred: (m: ServerMessage) => m is T, timeoutMs?: number): Promise<T>;
  /** Settles with the close code and reason once the socket is closed (by either side). */
  readonly closed: Promise<{ code: number; reason: string }>;
  close(): void;
}

export async function fakeAgent(cpUrl: string, token: string): Promise<FakeAgent> {
  const url = `${cpUrl.replace(/^http/, "ws")}${AGENT_PATH}`;
  const ws = new WebSocket(url, { headers: { authorization: `Bearer ${token}` } });
  const received: ServerMessage[] = [];
  ws.on("message", (data) => received.push(JSON.parse(String(data)) as ServerMessage));
  const closed = new Promise<{ code: number; reason: string }>((resolve) =>
    ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })),
  );
  await new Promise<void>((resolve, reject) => {
    ws.once("open", () => resolve());
    ws.once("error", reject);
  });
  const send = (msg: object | string) =>
    ws.send(typeof msg === "string" ? msg : JSON.stringify(msg));
  return {
    received,
    send,
    hello: (over = {}) =>
      send({
        v: PROTOCOL_VERSION,
        type: "hello",
        agent_version: "0.0.0-fake",
        host_name: "fake",
        driver: "sim",
        capabilities: FAKE_CAPABILITIES,
        capacity: { vcpus: 4, memory_bytes: 8 * 2 ** 30 },
        inventory: [],
        images: [],
        in_flight: [],
        ...over,
      }),
    next: (pred, timeoutMs = 10_000) =>
      waitFor(() => received.find(pred), { timeoutMs, what: "a message from the control plane" }),
    closed,
    close: () => ws.close(1000, "test done"),
  };
}

/** Type guards for FakeAgent.next. */
export const isWelcome = (m: ServerMessage): m is Extract<ServerMessage, { type: "welcome" }> =>
  m.type === "welcome";
export const isCommand = (m: ServerMessage): m is Extract<ServerMessage, { type: "command" }> =>
  m.type === "command";
