// The daemon core. Hosts sit behind NAT, so the agent dials out and holds one WebSocket to the
// control plane; it never listens. Everything it must not forget lives in the journal, so the
// connection can drop at any moment: on reconnect, hello reports the full inventory and the
// commands still executing, and the control plane re-sends whatever it has not heard back about.
import { readFileSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import {
  AGENT_LIMITS,
  AGENT_PATH,
  type AgentMessage,
  ARCHIVE_PATH,
  CLOSE,
  decodeStreamData,
  encode,
  fitAgentMessage,
  MEMORY_REPORT_MS,
  PROTOCOL_VERSION,
  ServerMessage,
} from "@offshoot/shared";
import WebSocket from "ws";
import { z } from "zod";
import { Commands } from "./commands.ts";
import type { AgentConfig } from "./config.ts";
import { claimDataDir } from "./data-dir.ts";
import type { Driver } from "./drivers/driver.ts";
import { createDriver } from "./drivers/index.ts";
import { ImageStore } from "./images/store.ts";
import { Journal } from "./journal.ts";
import { errorMessage, type Logger, stdoutLogger } from "./log.ts";
import { LogStreams } from "./logs.ts";
import { HostOps } from "./operations/host-ops.ts";
import { ImagePulls } from "./operations/image-pull.ts";
import { OperationsLog } from "./operations-log.ts";
import { type AgentPaths, agentPaths } from "./paths.ts";
import { Streams } from "./streams.ts";
import { VolumeStore } from "./volumes.ts";

export const AGENT_VERSION = z
  .object({ version: z.string() })
  .parse(JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8"))).version;

export interface AgentOptions {
  /** Defaults to the driver the config names. */
  driver?: Driver;
  log?: Logger;
  /** Reconnect delays: full jitter over base·2^attempt, capped. */
  backoff?: { baseMs: number; capMs: number };
  /** How long an open socket may wait for welcome before the agent gives up on it. */
  welcomeTimeoutMs?: number;
  /** How long shutdown waits for running commands to reach the journal. */
  shutdownGraceMs?: number;
  /** Outcomes the journal keeps for replay. */
  journalKeep?: number;
}

export interface RunningAgent {
  readonly driver: Driver;
  /** The id the control plane gave this host in its last welcome; null before one. */
  hostId(): string | null;
  /** Closes the socket (1000), waits briefly for running commands, releases the data dir. */
  stop(): Promise<void>;
}

/** Full jitter (AWS's "Exponential Backoff And Jitter"): agents reconnecting after a control
 * plane restart spread out instead of arriving in waves. */
export function backoffDelay(attempt: number, baseMs: number, capMs: number): number {
  return Math.floor(Math.random() * Math.min(capMs, baseMs * 2 ** attempt));
}

export async function startAgent(
  config: AgentConfig,
  options: AgentOptions = {},
): Promise<RunningAgent> {
  const log = options.log ?? stdoutLogger;
  const paths = agentPaths(config.dataDir, config.sim.stateDir);
  await mkdir(paths.root, { recursive: true });
  const release = await claimDataDir(paths);
  let journal: Journal | undefined;
  try {
    const images = new ImageStore(paths.imagesDir, config.pulls.rootfsFormat);
    const volumes = new VolumeStore(paths.volumesDir);
    const driver = options.driver ?? (await createDriver(config, paths, log, images, volumes));
    journal = await Journal.open(paths.journal, { keep: options.journalKeep });
    const link = new Link(config, options, log, driver, images, volumes, journal, release, paths);
    await link.commands.recover();
    log("info", "agent started", {
      version: AGENT_VERSION,
      host_name: config.hostName,
      driver: driver.name,
      data_dir: config.dataDir,
      pid: process.pid,
    });
    link.connect();
    return { driver, hostId: () => link.hostId, stop: () => link.stop() };
  } catch (err) {
    await journal?.close();
    await release();
    throw err;
  }
}

class Link {
  readonly commands: Commands;
  private readonly logs: LogStreams;
  private readonly streams: Streams;
  hostId: string | null = null;
  private ws: WebSocket | null = null;
  private helloSent = false;
  private attempt = 0;
  /** Which of the configured control-plane URLs the next connection dials. */
  private urlIndex = 0;
  private stopping = false;
  /** Whether anything (message or pong) arrived since the last beat. */
  private heard = false;
  private silentBeats = 0;
  private rejected = false;
  private timers: { reconnect?: NodeJS.Timeout; welcome?: NodeJS.Timeout; beat?: NodeJS.Timeout } =
    {};
  private readonly unsubscribe: () => void;
  private readonly backoff: { baseMs: number; capMs: number };

  constructor(
    private readonly config: AgentConfig,
    private readonly options: AgentOptions,
    private readonly log: Logger,
    private readonly driver: Driver,
    private readonly images: ImageStore,
    volumes: VolumeStore,
    private readonly journal: Journal,
    private readonly release: () => Promise<void>,
    paths: AgentPaths,
  ) {
    this.backoff = options.backoff ?? { baseMs: 200, capMs: 5_000 };
    const operationsLog = new OperationsLog((id) => paths.operationsLog(id), log);
    this.commands = new Commands(
      journal,
      driver,
      log,
      (result) => this.send(result),
      operationsLog,
      new HostOps(
        // Progress is news, not record: lost while disconnected (the result is not).
        new ImagePulls(
          images,
          config.pulls,
          log,
          (progress) => this.send(progress),
          () => driver.rootfsInUse(),
        ),
        volumes,
        driver,
        (id) => fetchArchive(config, id),
      ),
    );
    this.logs = new LogStreams(driver, paths, operationsLog);
    this.streams = new Streams(driver, log);
    // Dropped while disconnected: the next hello's inventory carries the same news.
    this.unsubscribe = driver.onEvent((instance) =>
      this.send({ v: PROTOCOL_VERSION, type: "event", instance }),
    );
  }

  connect(): void {
    if (this.stopping) return;
    const urls = this.config.connectUrls;
    const url = urls[this.urlIndex % urls.length] ?? "";
    this.log("info", "connecting", { url, attempt: this.attempt });
    this.rejected = false;
    this.helloSent = false;
    const ws = new WebSocket(url, {
      headers: { authorization: `Bearer ${this.config.hostToken}` },
      handshakeTimeout: 10_000,
      maxPayload: AGENT_LIMITS.frameBytes,
    });
    this.ws = ws;
    const current = () => ws === this.ws;
    ws.on("open", () => current() && this.onOpen(ws));
    ws.on("message", (data, isBinary) => current() && this.onMessage(ws, data, isBinary));
    ws.on("pong", () => {
      this.heard = true;
    });
    // A control plane may refuse the token during the upgrade instead of closing with 4401.
    ws.on("unexpected-response", (_req, res) => {
      this.rejected = res.statusCode === 401 || res.statusCode === 403;
      this.log("warn", "handshake refused", { status: res.statusCode });
      ws.terminate();
    });
    ws.on(
      "error",
      (err) => current() && this.log("warn", "connection error", { error: err.message }),
    );
    ws.on("close", (code, reason) => current() && this.onClose(code, reason.toString()));
  }

  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    this.log("info", "shutting down", { in_flight: this.commands.inFlight() });
    clearTimeout(this.timers.reconnect);
    const ws = this.ws;
    if (ws) {
      const closed = new Promise<void>((resolve) => ws.once("close", () => resolve()));
      if (ws.readyState === WebSocket.OPEN) ws.close(1000, "agent shutting down");
      else ws.terminate();
      const timer = setTimeout(() => ws.terminate(), 2_000);
      await closed;
      clearTimeout(timer);
    }
    await this.commands.drain(this.options.shutdownGraceMs ?? 5_000);
    this.unsubscribe();
    await this.journal.close();
    await this.driver.close();
    await this.release();
    this.log("info", "stopped");
  }

  private send(msg: AgentMessage): void {
    if (this.helloSent && this.ws?.readyState === WebSocket.OPEN) {
      this.ws.send(encode(fitAgentMessage(msg)));
    }
  }

  private async onOpen(ws: WebSocket): Promise<void> {
    this.heard = true;
    this.timers.welcome = setTimeout(() => {
      this.log("warn", "no welcome from the control plane; reconnecting");
      ws.terminate();
    }, this.options.welcomeTimeoutMs ?? 10_000);
    try {
      const inventory = await this.driver.inventory();
      const images = await this.driver.images();
      const image_digests = await this.images.pulledDigests();
      const snapshots = await this.driver.snapshotIds();
      if (ws !== this.ws || ws.readyState !== WebSocket.OPEN) return;
      const in_flight = this.commands.inFlight();
      ws.send(
        encode(
          fitAgentMessage({
            v: PROTOCOL_VERSION,
            type: "hello",
            agent_version: AGENT_VERSION,
            host_name: this.config.hostName,
            driver: this.driver.name,
            capabilities: this.driver.capabilities(),
            capacity: this.config.capacity,
            inventory,
            images,
            image_digests,
            in_flight,
            snapshots,
          }),
        ),
      );
      this.helloSent = true;
      this.log("info", "hello sent", { instances: inventory.length, in_flight });
    } catch (err) {
      this.log("error", "cannot build hello", { error: errorMessage(err) });
      ws.terminate();
    }
  }

  private onMessage(ws: WebSocket, data: WebSocket.RawData, isBinary: boolean): void {
    this.heard = true;
    if (isBinary) {
      const frame = decodeStreamData(toBytes(data));
      if (frame) this.streams.data(frame.streamId, frame.text, frame.payload);
      else this.log("warn", "ignoring an unreadable stream frame");
      return;
    }
    let parsed: ReturnType<typeof ServerMessage.safeParse>;
    try {
      parsed = ServerMessage.safeParse(JSON.parse(data.toString()));
    } catch (err) {
      this.log("warn", "ignoring unreadable message", { error: errorMessage(err) });
      return;
    }
    if (!parsed.success) {
      this.log("warn", "ignoring invalid message", { error: parsed.error.issues[0]?.message });
      return;
    }
    const msg = parsed.data;
    if (msg.type === "welcome") {
      clearTimeout(this.timers.welcome);
      clearInterval(this.timers.beat);
      this.hostId = msg.host_id;
      this.attempt = 0;
      this.silentBeats = 0;
      this.log("info", "connected", { host_id: msg.host_id, heartbeat_ms: msg.heartbeat_ms });
      this.timers.beat = setInterval(() => this.beat(ws, msg.heartbeat_ms), msg.heartbeat_ms);
      this.streams.attach({
        control: (m) => this.send(m),
        data: (frame, sent) => {
          if (ws.readyState === WebSocket.OPEN) ws.send(frame, { binary: true }, () => sent());
        },
        buffered: () => ws.bufferedAmount,
      });
      return;
    }
    if (msg.type === "stream_open") {
      this.streams.open(msg);
      return;
    }
    if (msg.type === "stream_credit") {
      this.streams.credited(msg.stream_id, msg.bytes);
      return;
    }
    if (msg.type === "stream_end") {
      this.streams.cancel(msg.stream_id);
      return;
    }
    if (msg.type === "logs") {
      this.logs.open(msg, (chunk) => this.send(chunk));
      return;
    }
    if (msg.type === "logs_cancel") {
      this.logs.cancel(msg.stream_id);
      return;
    }
    if (msg.type === "logs_ack") {
      this.logs.ack(msg.stream_id, msg.chunks);
      return;
    }
    const disposition = this.commands.handle(msg);
    if (disposition === "refused") {
      this.log("warn", "command refused", { command_id: msg.id, reason: "shutting down" });
    }
  }

  /** Heartbeat out, ping for liveness: a control plane that has sent nothing, not even a pong,
   * for 3 heartbeats is gone (half-open TCP after NAT churn looks exactly like this). Counted
   * in beats, not wall time, so a stall of the agent's own event loop is not blamed on it. */
  private beat(ws: WebSocket, heartbeatMs: number): void {
    if (ws.readyState !== WebSocket.OPEN) return; // closing: onClose clears this timer
    this.silentBeats = this.heard ? 0 : this.silentBeats + 1;
    this.heard = false;
    if (this.silentBeats >= 3) {
      this.log("warn", "control plane unresponsive; reconnecting", {
        silent_ms: this.silentBeats * heartbeatMs,
      });
      ws.terminate();
      return;
    }
    this.send({ v: PROTOCOL_VERSION, type: "heartbeat", sent_at: Date.now() });
    ws.ping();
    if (this.driver.memoryReport && Date.now() - this.memoryReportedAt >= MEMORY_REPORT_MS) {
      this.memoryReportedAt = Date.now();
      this.driver
        .memoryReport()
        .then((r) => this.send({ v: PROTOCOL_VERSION, type: "memory", ...r }))
        .catch((e: unknown) =>
          this.log("warn", "memory report failed", { error: errorMessage(e) }),
        );
    }
  }
  private memoryReportedAt = 0;

  private onClose(code: number, reason: string): void {
    this.logs.cancelAll();
    this.streams.closeAll();
    clearTimeout(this.timers.welcome);
    clearInterval(this.timers.beat);
    this.memoryReportedAt = 0; // the next connection hears it at once
    this.ws = null;
    this.helloSent = false;
    if (this.stopping) return;
    const { baseMs, capMs } = this.backoff;
    let delay: number;
    if (code === CLOSE.unauthorized || this.rejected) {
      // Retry slowly rather than exit: an admin may fix the token without touching this host.
      delay = capMs;
      this.log("error", "unauthorized: the control plane rejected HOST_TOKEN; retrying", {
        code,
        reason,
        retry_ms: delay,
      });
    } else {
      delay = backoffDelay(this.attempt, baseMs, capMs);
      this.log("warn", "disconnected", { code, reason, retry_ms: delay });
    }
    this.attempt++;
    // A lost or refused connection may mean that replica is gone: the next attempt dials the
    // next URL (with one load-balanced URL, the same one again).
    this.urlIndex++;
    this.timers.reconnect = setTimeout(() => this.connect(), delay);
  }
}

/** A volume's archive from the control plane (any of its URLs that answers), with this host's
 * token. */
async function fetchArchive(config: AgentConfig, id: string): Promise<AsyncIterable<Uint8Array>> {
  let last = "no control-plane URL";
  for (const ws of config.connectUrls) {
    const url = ws.replace(/^ws/, "http").replace(AGENT_PATH, ARCHIVE_PATH.replace(":id", id));
    try {
      const res = await fetch(url, { headers: { authorization: `Bearer ${config.hostToken}` } });
      if (res.ok && res.body) return res.body as unknown as AsyncIterable<Uint8Array>;
      last = `${url} answered ${res.status}`;
      await res.body?.cancel();
    } catch (e) {
      last = `${url}: ${errorMessage(e)}`;
    }
  }
  throw new Error(`cannot fetch the volume's archive: ${last}`);
}

/** A ws message's bytes, however ws delivered them. */
function toBytes(data: WebSocket.RawData): Uint8Array {
  if (Array.isArray(data)) return Buffer.concat(data);
  return data instanceof ArrayBuffer ? new Uint8Array(data) : data;
}
