// The agent protocol: JSON text frames on one WebSocket that the agent dials. Every message
// carries `v`, so either side can refuse a version it does not speak. Both directions are
// typed here and parsed with zod on receipt.
import { z } from "zod";
import { type ErrorCode, isErrorCode } from "./errors.ts";
import { DIGEST, ImageInfo } from "./images.ts";
import {
  ForkTargetState,
  Hypervisor,
  InstanceState,
  SnapshotCompression,
  SnapshotKind,
} from "./schemas.ts";
import { StreamCredit, StreamId, StreamOpen } from "./tunnel.ts";

export const PROTOCOL_VERSION = 1 as const;
/** Where agents dial in, under the control plane's base URL. */
export const AGENT_PATH = "/agent/v1/connect";
/** Where an agent fetches a volume's archive (GET, its host token as Bearer), `:id` replaced. */
export const ARCHIVE_PATH = "/agent/v1/archives/:id";
const V = z.literal(PROTOCOL_VERSION);

/**
 * Bounds on what crosses the agent socket. Hosts are trusted to run guests, not to size the
 * control plane's memory: every message is bounded, and a frame over `frameBytes` closes the
 * socket (1009) before it is buffered whole. The agent clips its free text to fit
 * (fitAgentMessage) rather than have a result refused.
 */
export const AGENT_LIMITS = {
  /** Largest WebSocket message either side accepts (a hello with a full inventory fits). */
  frameBytes: 8 * 1024 * 1024,
  /** Instances one hello may report. */
  inventory: 20_000,
  /** Images one hello may report (imported ones, and digests of pulled ones). */
  images: 1_000,
  imageDigests: 10_000,
  /** Commands one hello may list as in flight (the journal keeps 10,000 outcomes). */
  inFlight: 10_000,
  /** Instances one result may report (a fork reports two). */
  resultInstances: 64,
  /** A log chunk: at most this many lines, this many characters of lines in all, and each
   * line at most `logLineChars` (the agent cuts longer lines). */
  logLines: 500,
  logChunkChars: 256 * 1024,
  logLineChars: 16 * 1024,
  /** Chunks a log stream may have sent and not yet had acknowledged (logs_ack): what a stream
   * can hold in the control plane while its reader is slow (4 × 256 Ki characters). */
  logWindow: 4,
  /** Free text (state_error, exit_message, error messages). */
  textChars: 4096,
  /** Capacity a host may offer. */
  vcpus: 4096,
  memoryBytes: 2 ** 46, // 64 TiB
} as const;

const Text = z.string().max(AGENT_LIMITS.textChars);
/** Instance and command ids: CUID2s and UUIDs, nothing that could name a path. */
const Id = z
  .string()
  .min(1)
  .max(64)
  .regex(/^[A-Za-z0-9][A-Za-z0-9_-]*$/, "ids are letters, digits, - and _");

/** WebSocket close codes the control plane uses towards agents. */
export const CLOSE = {
  unauthorized: 4401,
  badProtocol: 4400,
  replaced: 4409,
  shuttingDown: 4503,
  /** The control plane lost track of this session (a failed write, a missed heartbeat
   * window): reconnect and say hello, so state is reconciled and pending commands re-sent. */
  resync: 4000,
} as const;

/** Everything a host needs to run an instance. Sizes are bytes, rates bytes per second. */
export const InstanceSpec = z.object({
  id: z.string(),
  name: z.string(),
  image: z.string(),
  /** The pulled image the instance boots (its manifest digest); null: an image the host
   * imported, found by name. A host that does not hold the digest pulls it first. */
  image_digest: z.string().regex(DIGEST).nullable().default(null),
  hypervisor: Hypervisor,
  vcpus: z.number().int().positive(),
  memory_bytes: z.number().int().positive(),
  hotplug_bytes: z.number().int().nonnegative(),
  overlay_bytes: z.number().int().positive(),
  disk_io_bps: z.number().int().nonnegative().nullable(),
  env: z.record(z.string(), z.string()),
  entrypoint: z.array(z.string()).nullable(),
  cmd: z.array(z.string()).nullable(),
  network: z.object({
    enabled: z.boolean(),
    mac: z.string().nullable(),
    ip: z.string().nullable(),
    /** The host's guest subnet ("10.64.16.0/20"; its first address is the gateway); null when
     * the network is disabled, or from a control plane older than guest subnets. */
    subnet: z.string().nullable().default(null),
    bandwidth_download_bps: z.number().int().nonnegative().nullable(),
    bandwidth_upload_bps: z.number().int().nonnegative().nullable(),
  }),
  /** No guest agent in the guest: no exec, cp or stat. */
  skip_guest_agent: z.boolean().default(false),
  /** Attached volumes, in order; `key` names the volume's file on the host (absent in specs
   * from before volumes were real: such a spec attaches none). */
  volumes: z.array(
    z.object({
      volume_id: z.string(),
      mount_path: z.string(),
      readonly: z.boolean().optional(),
      overlay: z.boolean().optional(),
      overlay_size: z.string().optional(),
      key: z
        .string()
        .regex(/^[a-z0-9]{1,64}$/)
        .optional(),
    }),
  ),
});
export type InstanceSpec = z.infer<typeof InstanceSpec>;

/** What the host actually sees for one instance. */
export const ObservedInstance = z.object({
  id: Id,
  state: InstanceState,
  has_snapshot: z.boolean(),
  state_error: Text.nullable().optional(),
  exit_code: z.number().int().nullable().optional(),
  exit_message: Text.nullable().optional(),
  started_at: z.iso.datetime({ offset: true }).nullable().optional(),
  stopped_at: z.iso.datetime({ offset: true }).nullable().optional(),
});
export type ObservedInstance = z.infer<typeof ObservedInstance>;

/** A snapshot as its host holds it. */
export const SnapshotInfo = z.object({
  id: Id,
  size_bytes: z.number().int().nonnegative(),
  /** snapshot_compress: the memory payload's bytes compressed, and as the guest sees them. */
  compressed_size_bytes: z.number().int().nonnegative().optional(),
  uncompressed_size_bytes: z.number().int().nonnegative().optional(),
});
export type SnapshotInfo = z.infer<typeof SnapshotInfo>;

export const Operation = z.discriminatedUnion("kind", [
  z.object({ kind: z.literal("create"), instance: InstanceSpec }),
  z.object({
    kind: z.literal("start"),
    instance_id: z.string(),
    entrypoint: z.array(z.string()).nullable().optional(),
    cmd: z.array(z.string()).nullable().optional(),
  }),
  z.object({ kind: z.literal("stop"), instance_id: z.string() }),
  z.object({ kind: z.literal("standby"), instance_id: z.string() }),
  z.object({ kind: z.literal("restore"), instance_id: z.string() }),
  z.object({ kind: z.literal("delete"), instance_id: z.string() }),
  z.object({
    kind: z.literal("fork"),
    source_id: z.string(),
    target: InstanceSpec,
    target_state: ForkTargetState,
    /** source_id names a snapshot of this host, not an instance. */
    from_snapshot: z.boolean().optional(),
  }),
  /** Captures a Stopped (kind Stopped) or Standby (kind Standby) instance as a snapshot of its
   * own; the instance is left as it was. */
  z.object({
    kind: z.literal("snapshot_create"),
    instance_id: z.string(),
    snapshot_id: Id,
    snapshot_kind: SnapshotKind,
  }),
  /** Puts a Stopped or Standby instance back to a snapshot, then brings it to target_state. */
  z.object({
    kind: z.literal("snapshot_restore"),
    instance_id: z.string(),
    snapshot_id: Id,
    target_state: ForkTargetState,
  }),
  /** Removes a snapshot's files (idempotent); forks made from it keep theirs. */
  z.object({ kind: z.literal("snapshot_delete"), snapshot_id: Id }),
  /** Keeps a Standby snapshot's memory compressed at rest (idempotent). Forks and restores
   * from it decompress it once, into a copy they share while any of them uses it. */
  z.object({
    kind: z.literal("snapshot_compress"),
    snapshot_id: Id,
    algorithm: SnapshotCompression,
    level: z.number().int().min(0).max(19),
  }),
  z.object({
    kind: z.literal("volume_create"),
    key: Id,
    size_bytes: z.number().int().positive(),
    /** A tar.gz to unpack into it, which the host fetches from the control plane
     * (ARCHIVE_PATH, with its host token) and may read only while this command is pending. */
    archive: z.object({ id: Id, bytes: z.number().int().nonnegative() }).optional(),
  }),
  z.object({ kind: z.literal("volume_delete"), key: Id }),
  z.object({
    kind: z.literal("image_pull"),
    image_id: z.string(),
    /** Normalized reference. */
    ref: z.string().max(1024),
    platform: z.string().max(64),
    /** The pull was asked for with credentials. They travel only in the command the control
     * plane sends first; a re-sent command (recorded without them) fails and asks for a new
     * pull, as Hypeman's API says of an interrupted credentialed operation. */
    credentialed: z.boolean(),
    credentials: z
      .object({
        username: z.string().optional(),
        password: z.string().optional(),
        registry_token: z.string().optional(),
      })
      .optional(),
  }),
]);
export type Operation = z.infer<typeof Operation>;

/** The commands that are the host's, not an instance's: they touch and lock no instance. */
export type HostOperation = Extract<
  Operation,
  {
    kind:
      | "image_pull"
      | "volume_create"
      | "volume_delete"
      | "snapshot_delete"
      | "snapshot_compress";
  }
>;
export const isHostOperation = (op: Operation): op is HostOperation =>
  op.kind === "image_pull" ||
  op.kind === "volume_create" ||
  op.kind === "volume_delete" ||
  op.kind === "snapshot_delete" ||
  op.kind === "snapshot_compress";
export type OperationKind = Operation["kind"];
/** The kinds of host command, as a schema (settings keyed by kind). */
export const OperationKind = z.enum(
  Operation.options.map((o) => o.shape.kind.value) as [OperationKind, ...OperationKind[]],
);

export const DriverCapabilities = z.object({
  hypervisors: z.array(Hypervisor),
  /** A host forks Stopped and Standby sources; a Running one is the control plane's flow
   * (standby, fork, restore), which needs `standby` and `fork_from_standby`. */
  fork_from_stopped: z.boolean(),
  fork_from_standby: z.boolean(),
  standby: z.boolean(),
  hotplug_memory: z.boolean(),
  disk_io_limit: z.boolean(),
  volumes: z.boolean(),
  /** Instances need an image this host has imported (reported in hello's `images`). */
  images: z.boolean().default(false),
  /** Standby snapshots' memory can be kept compressed (snapshot_compress). */
  snapshot_compression: z.boolean().default(false),
  /** The smallest guest memory this host's guests boot with (a request for less is refused). */
  min_memory_bytes: z.number().int().nonnegative().default(0),
});
export type DriverCapabilities = z.infer<typeof DriverCapabilities>;

/** Why a command failed: one of the API's error codes. A code this side does not know (a newer
 * agent's) is read as `internal_error`, the code kept at the front of the message (which stays
 * within AGENT_LIMITS.textChars). */
export const CommandError = z
  .object({ code: z.string().max(64), message: Text })
  .transform((e): { code: ErrorCode; message: string } =>
    isErrorCode(e.code)
      ? { code: e.code, message: e.message }
      : {
          code: "internal_error",
          message: `${e.code}: ${e.message}`.slice(0, AGENT_LIMITS.textChars),
        },
  );
export type CommandError = z.infer<typeof CommandError>;

// ---- agent → control plane -------------------------------------------------------------

export const Hello = z.object({
  v: V,
  type: z.literal("hello"),
  agent_version: z.string().max(64),
  host_name: z.string().max(253),
  driver: z.string().max(32),
  capabilities: DriverCapabilities,
  capacity: z.object({
    vcpus: z.number().int().positive().max(AGENT_LIMITS.vcpus),
    memory_bytes: z.number().int().positive().max(AGENT_LIMITS.memoryBytes),
  }),
  inventory: z.array(ObservedInstance).max(AGENT_LIMITS.inventory),
  /** The images this host can boot (drivers with the `images` capability). */
  images: z.array(ImageInfo).max(AGENT_LIMITS.images).default([]),
  /** Digests of the pulled images this host holds. */
  image_digests: z.array(z.string().regex(DIGEST)).max(AGENT_LIMITS.imageDigests).default([]),
  /** Commands the agent has journaled but not finished (still executing). */
  in_flight: z.array(Id).max(AGENT_LIMITS.inFlight),
  /** The snapshots this host holds, by id (absent from older agents: nothing is reconciled). */
  snapshots: z.array(Id).max(AGENT_LIMITS.inventory).optional(),
});
export type Hello = z.infer<typeof Hello>;

export const Heartbeat = z.object({ v: V, type: z.literal("heartbeat"), sent_at: z.number() });
export type Heartbeat = z.infer<typeof Heartbeat>;

/** What a host found pulling an image (the result of image_pull). */
export const PulledImageInfo = z.object({
  digest: z.string().regex(DIGEST),
  platform: z.string().max(64),
  size_bytes: z.number().int().nonnegative(),
  entrypoint: z.array(z.string().max(AGENT_LIMITS.textChars)).max(256).nullable(),
  cmd: z.array(z.string().max(AGENT_LIMITS.textChars)).max(256).nullable(),
  env: z.record(z.string().max(256), z.string().max(AGENT_LIMITS.textChars)),
  working_dir: z.string().max(AGENT_LIMITS.textChars).nullable(),
});
export type PulledImageInfo = z.infer<typeof PulledImageInfo>;

export const Result = z.discriminatedUnion("ok", [
  z.object({
    v: V,
    type: z.literal("result"),
    command_id: Id,
    ok: z.literal(true),
    /** The instances this command changed, as observed after it. */
    instances: z.array(ObservedInstance).max(AGENT_LIMITS.resultInstances),
    /** image_pull: what was pulled. */
    image: PulledImageInfo.optional(),
    /** snapshot_create: what was captured. */
    snapshot: SnapshotInfo.optional(),
    /** Set when the answer came from the journal (a re-sent command). */
    replayed: z.boolean().optional(),
  }),
  z.object({
    v: V,
    type: z.literal("result"),
    command_id: Id,
    ok: z.literal(false),
    error: CommandError,
    instances: z.array(ObservedInstance).max(AGENT_LIMITS.resultInstances),
    replayed: z.boolean().optional(),
  }),
]);
export type Result = z.infer<typeof Result>;

/** How far an image_pull has got (sent at most every half second, and on each phase). */
export const ImageProgress = z.object({
  v: V,
  type: z.literal("image_progress"),
  command_id: Id,
  image_id: Id,
  phase: z.enum(["pulling", "converting"]),
  bytes_done: z.number().int().nonnegative(),
  bytes_total: z.number().int().nonnegative(),
});
export type ImageProgress = z.infer<typeof ImageProgress>;

/** A state change the host observed on its own (guest exited, VMM died, …). */
export const Event = z.object({ v: V, type: z.literal("event"), instance: ObservedInstance });
export type Event = z.infer<typeof Event>;

/** Lines of a log stream the control plane asked for; `done` ends the stream. */
export const LogChunk = z.object({
  v: V,
  type: z.literal("log"),
  stream_id: Id,
  lines: z
    .array(z.string().max(AGENT_LIMITS.logLineChars))
    .max(AGENT_LIMITS.logLines)
    .refine(
      (lines) => lines.reduce((n, l) => n + l.length, 0) <= AGENT_LIMITS.logChunkChars,
      "log chunk too large",
    ),
  done: z.boolean().optional(),
  error: CommandError.optional(),
});
export type LogChunk = z.infer<typeof LogChunk>;

/** Either way: a stream (tunnel.ts) is over. From the agent, after its last message; `error` when
 * it could not be served at all (the control plane answers the client with it). */
export const StreamEnd = z.object({
  v: V,
  type: z.literal("stream_end"),
  stream_id: StreamId,
  reason: z.string().max(1024).optional(),
  error: CommandError.optional(),
});
export type StreamEnd = z.infer<typeof StreamEnd>;

/**
 * What guests' memory really costs the host, every MEMORY_REPORT_MS from an agent whose driver
 * can tell: the host's MemAvailable, and for each Running guest whose RAM maps a memory base
 * shared with others (a fork of a snapshot or of a Standby instance) the bytes only it holds.
 * A guest not listed costs its nominal size.
 */
export const MemoryReport = z.object({
  v: V,
  type: z.literal("memory"),
  available_bytes: z.number().int().nonnegative(),
  charges: z
    .array(z.object({ id: Id, bytes: z.number().int().nonnegative() }))
    .max(AGENT_LIMITS.inventory),
});
export type MemoryReport = z.infer<typeof MemoryReport>;
export const MEMORY_REPORT_MS = 10_000;

export const AgentMessage = z.union([
  Hello,
  Heartbeat,
  MemoryReport,
  Result,
  Event,
  LogChunk,
  ImageProgress,
  StreamCredit,
  StreamEnd,
]);
export type AgentMessage = z.infer<typeof AgentMessage>;

// ---- control plane → agent -------------------------------------------------------------

export const Welcome = z.object({
  v: V,
  type: z.literal("welcome"),
  host_id: z.string(),
  heartbeat_ms: z.number().int().positive(),
});
export type Welcome = z.infer<typeof Welcome>;

export const Command = z.object({
  v: V,
  type: z.literal("command"),
  id: z.string(),
  op: Operation,
});
export type Command = z.infer<typeof Command>;

/** app: the guest's serial console; vmm: the hypervisor's output; hypeman: the agent's own
 * record of the operations it ran on the instance. */
export const LogSource = z.enum(["app", "vmm", "hypeman"]);
export type LogSource = z.infer<typeof LogSource>;

/** The last `tail` lines of an instance's log and, with `follow`, the lines that come after. */
export const LogQuery = z.object({
  instance_id: z.string(),
  source: LogSource,
  tail: z.number().int().nonnegative(),
  follow: z.boolean(),
});
export type LogQuery = z.infer<typeof LogQuery>;

/** Asks for a log stream. */
export const LogsRequest = z.object({
  v: V,
  type: z.literal("logs"),
  stream_id: z.string(),
  ...LogQuery.shape,
});
export type LogsRequest = z.infer<typeof LogsRequest>;

export const LogsCancel = z.object({ v: V, type: z.literal("logs_cancel"), stream_id: z.string() });
export type LogsCancel = z.infer<typeof LogsCancel>;

/** The reader took `chunks` more chunks of a stream: the agent may send as many more. A stream
 * starts with AGENT_LIMITS.logWindow chunks of credit, so a slow reader slows the agent's reading
 * of the file instead of filling the control plane's memory. */
export const LogsAck = z.object({
  v: V,
  type: z.literal("logs_ack"),
  stream_id: z.string(),
  chunks: z.number().int().positive().max(AGENT_LIMITS.logWindow),
});
export type LogsAck = z.infer<typeof LogsAck>;

/**
 * Re-send contract: after every hello the control plane re-sends each command of that host
 * that has no recorded result, oldest first. The agent answers a command id it has finished
 * from its journal (which keeps the last 10,000 outcomes) and ignores one it is still running.
 */
export const ServerMessage = z.union([
  Welcome,
  Command,
  LogsRequest,
  LogsCancel,
  LogsAck,
  StreamOpen,
  StreamCredit,
  StreamEnd,
]);
export type ServerMessage = z.infer<typeof ServerMessage>;

/**
 * Log lines as chunks a LogChunk may carry: lines over AGENT_LIMITS.logLineChars are cut into
 * pieces of that length, and a chunk holds at most logLines lines and logChunkChars characters.
 */
export function logChunks(lines: readonly string[]): string[][] {
  const out: string[][] = [];
  let cur: string[] = [];
  let size = 0;
  const push = (line: string) => {
    if (
      cur.length > 0 &&
      (cur.length >= AGENT_LIMITS.logLines || size + line.length > AGENT_LIMITS.logChunkChars)
    ) {
      out.push(cur);
      cur = [];
      size = 0;
    }
    cur.push(line);
    size += line.length;
  };
  for (const line of lines) {
    if (line.length <= AGENT_LIMITS.logLineChars) push(line);
    else
      for (let i = 0; i < line.length; i += AGENT_LIMITS.logLineChars)
        push(line.slice(i, i + AGENT_LIMITS.logLineChars));
  }
  if (cur.length > 0) out.push(cur);
  return out;
}

const clip = (text: string) =>
  text.length <= AGENT_LIMITS.textChars ? text : `${text.slice(0, AGENT_LIMITS.textChars - 1)}…`;

function clipObserved(o: ObservedInstance): ObservedInstance {
  return {
    ...o,
    ...(o.state_error && { state_error: clip(o.state_error) }),
    ...(o.exit_message && { exit_message: clip(o.exit_message) }),
  };
}

/** The message with its free text (error messages, state_error, exit_message) clipped to
 * AGENT_LIMITS.textChars, so that a long QEMU complaint cannot get a result refused. */
export function fitAgentMessage<M extends AgentMessage>(msg: M): M {
  switch (msg.type) {
    case "result":
      return {
        ...msg,
        instances: msg.instances.map(clipObserved),
        ...(!msg.ok && { error: { ...msg.error, message: clip(msg.error.message) } }),
      };
    case "event":
      return { ...msg, instance: clipObserved(msg.instance) };
    case "hello":
      return { ...msg, inventory: msg.inventory.map(clipObserved) };
    default:
      return msg;
  }
}

export function encode(msg: AgentMessage | ServerMessage): string {
  return JSON.stringify(msg);
}
