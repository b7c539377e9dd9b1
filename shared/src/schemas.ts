// The wire contract, defined once. Field names, formats and validation rules follow Hypeman's
// OpenAPI spec; the control plane's routes, the OpenAPI document and the agent protocol all
// import these.
import { z } from "@hono/zod-openapi";
import { parseRate, parseSize, UnitParseError } from "./units.ts";

export const NAME_PATTERN = /^[a-z0-9]([a-z0-9-]*[a-z0-9])?$/;

export const InstanceState = z
  .enum([
    "Created",
    "Initializing",
    "Running",
    "Paused",
    "Shutdown",
    "Stopped",
    "Standby",
    "Unknown",
  ])
  .openapi("InstanceState", {
    description:
      "Created/Paused/Shutdown: VMM states; Initializing: guest init in progress; Running: program started; Stopped: no VMM, no snapshot; Standby: no VMM, snapshot exists; Unknown: see state_error",
  });
export type InstanceState = z.infer<typeof InstanceState>;

export const Hypervisor = z
  .enum(["cloud-hypervisor", "firecracker", "qemu", "qemu-microvm", "vz"])
  .openapi("Hypervisor");
export type Hypervisor = z.infer<typeof Hypervisor>;

export const ForkTargetState = z.enum(["Stopped", "Standby", "Running"]).openapi("ForkTargetState");
export type ForkTargetState = z.infer<typeof ForkTargetState>;

export const ErrorBody = z
  .object({
    code: z.string().openapi({ example: "invalid_state" }),
    message: z.string().openapi({ example: "instance is Running; stop it first" }),
  })
  .openapi("Error");
export type ErrorBody = z.infer<typeof ErrorBody>;

export const InstanceName = z
  .string()
  .max(63, "name must be at most 63 characters")
  .regex(
    NAME_PATTERN,
    "name must be lowercase letters, digits and dashes, and cannot start or end with a dash",
  )
  .openapi({ example: "my-workload-1" });

const TAG_KEY = /^[A-Za-z0-9 _.:/=+@-]+$/;
const TAG_VALUE = /^[A-Za-z0-9 _.:/=+@-]*$/;
export const Tags = z
  .record(
    z.string().min(1).max(128).regex(TAG_KEY, "invalid tag key"),
    z.string().max(256).regex(TAG_VALUE, "invalid tag value"),
  )
  .refine((t) => Object.keys(t).length <= 50, "at most 50 tags")
  .openapi("Tags", { example: { team: "backend", env: "staging" } });
export type Tags = z.infer<typeof Tags>;

const ENV_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/;
export const Env = z
  .record(
    z.string().regex(ENV_KEY, "environment variable names are letters, digits and _"),
    z.string().max(32_768),
  )
  .refine((e) => Object.keys(e).length <= 256, "at most 256 environment variables");

/** What one instance may carry as env, entrypoint and cmd together (their JSON, in UTF-8 bytes):
 * enough for any program's configuration, small enough that a listing of many instances, sent
 * as a stream, never holds much of it at once. */
export const MAX_INSTANCE_METADATA_BYTES = 128 * 1024;

/** Refuses a request whose env, entrypoint and cmd together exceed MAX_INSTANCE_METADATA_BYTES. */
function metadataWithinLimit(
  r: { env?: unknown; entrypoint?: unknown; cmd?: unknown },
  ctx: z.core.$RefinementCtx,
) {
  const bytes = new TextEncoder().encode(
    JSON.stringify({ env: r.env, entrypoint: r.entrypoint, cmd: r.cmd }),
  ).length;
  if (bytes > MAX_INSTANCE_METADATA_BYTES) {
    ctx.addIssue({
      code: "custom",
      message: `env, entrypoint and cmd together may be at most ${MAX_INSTANCE_METADATA_BYTES} bytes of JSON; these are ${bytes}`,
    });
  }
}

function humanString(parse: (s: string) => number, example: string) {
  return z
    .string()
    .max(32)
    .superRefine((s, ctx) => {
      try {
        parse(s);
      } catch (e) {
        ctx.addIssue({
          code: "custom",
          message: e instanceof UnitParseError ? e.message : String(e),
        });
      }
    })
    .openapi({ example });
}
export const SizeString = humanString(parseSize, "2GB");
export const RateString = humanString(parseRate, "100MB/s");

export const VolumeMount = z
  .object({
    volume_id: z.string().min(1).max(128).openapi({ example: "vol-abc123" }),
    mount_path: z
      .string()
      .min(2)
      .max(4096)
      .regex(/^\/[^\0]*$/, "mount_path must be an absolute path")
      .openapi({ example: "/mnt/data" }),
    readonly: z.boolean().optional(),
    overlay: z.boolean().optional(),
    overlay_size: SizeString.optional(),
  })
  .superRefine((v, ctx) => {
    if (v.overlay && !v.readonly) {
      ctx.addIssue({
        code: "custom",
        message: "volume overlay requires readonly=true",
        path: ["overlay"],
      });
    }
    if (v.overlay && !v.overlay_size) {
      ctx.addIssue({
        code: "custom",
        message: "overlay_size is required when overlay=true",
        path: ["overlay_size"],
      });
    }
  })
  .openapi("VolumeMount");
export type VolumeMount = z.infer<typeof VolumeMount>;

/** Volume ids: what a user may choose (and what is generated): no path, no spaces. */
export const VOLUME_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
/** The largest volume a request may ask for. */
export const MAX_VOLUME_GB = 2048;

export const VolumeAttachment = z
  .object({
    instance_id: z.string(),
    mount_path: z.string(),
    readonly: z.boolean(),
  })
  .openapi("VolumeAttachment");

export const Volume = z
  .object({
    id: z.string().openapi({ example: "vol-data-1" }),
    name: z.string(),
    size_gb: z.number().int(),
    attachments: z.array(VolumeAttachment).optional(),
    tags: z.record(z.string(), z.string()).optional(),
    created_at: z.string().openapi({ format: "date-time" }),
  })
  .openapi("Volume");
export type Volume = z.infer<typeof Volume>;

export const CreateVolumeRequest = z
  .object({
    name: z.string().min(1).max(255),
    size_gb: z.number().int().min(1).max(MAX_VOLUME_GB),
    id: z
      .string()
      .regex(VOLUME_ID, "id must be 1–63 letters, digits, _ . -, starting with a letter or digit")
      .optional(),
    tags: Tags.optional(),
  })
  .openapi("CreateVolumeRequest");
export type CreateVolumeRequest = z.infer<typeof CreateVolumeRequest>;

export const InstanceGPU = z
  .object({ profile: z.string().optional(), mdev_uuid: z.string().optional() })
  .openapi("InstanceGPU");

export const InstanceNetwork = z
  .object({
    enabled: z.boolean().optional(),
    name: z.string().optional(),
    ip: z.string().nullable().optional(),
    mac: z.string().nullable().optional(),
    bandwidth_download: z.string().optional(),
    bandwidth_upload: z.string().optional(),
  })
  .openapi("InstanceNetwork");

/** The contract's Instance (its 22 fields, plus `expires_at`, which the official client requires), with their exact JSON names. */
export const Instance = z
  .object({
    id: z.string().openapi({ description: "CUID2", example: "tz4a98xxat96iws9zmbrgj3a" }),
    created_at: z.string().openapi({ format: "date-time" }),
    /** Always null: instances do not expire here (a create with `ttl` or `expires_at` is 501). */
    expires_at: z.string().nullable().openapi({ format: "date-time" }),
    image: z.string(),
    name: z.string(),
    state: InstanceState,
    disk_io_bps: z.string().optional(),
    env: z.record(z.string(), z.string()).optional(),
    exit_code: z.number().int().nullable().optional(),
    exit_message: z.string().optional(),
    gpu: InstanceGPU.optional(),
    has_snapshot: z.boolean().optional(),
    hotplug_size: z.string().optional(),
    hypervisor: Hypervisor.optional(),
    network: InstanceNetwork.optional(),
    overlay_size: z.string().optional(),
    size: z.string().optional(),
    started_at: z.string().nullable().optional().openapi({ format: "date-time" }),
    state_error: z.string().nullable().optional(),
    stopped_at: z.string().nullable().optional().openapi({ format: "date-time" }),
    tags: z.record(z.string(), z.string()).optional(),
    vcpus: z.number().int().optional(),
    volumes: z.array(VolumeMount).optional(),
    forked_from: z.string().nullable().optional().openapi({
      description:
        "The id of the instance this one was forked from (for a fork of a snapshot, the snapshot's source), null for one created; an extension of Hypeman's Instance",
    }),
    host_id: z.string().nullable().optional().openapi({
      description:
        "The id of the host the instance lives on (see GET /hosts), null before one is chosen; an extension of Hypeman's Instance",
    }),
  })
  .openapi("Instance");
export type Instance = z.infer<typeof Instance>;

export const CreateInstanceNetwork = z.object({
  enabled: z.boolean().optional(),
  bandwidth_download: RateString.optional(),
  bandwidth_upload: RateString.optional(),
  egress: z.unknown().optional(),
});

export const CreateInstanceRequest = z
  .object({
    name: InstanceName,
    image: z
      .string()
      .min(1, "image is required")
      .max(512)
      .regex(/^[^\s]+$/, "image must be an OCI reference without spaces")
      .openapi({ example: "docker.io/library/alpine:latest" }),
    platform: z
      .string()
      .regex(/^[a-z0-9]+\/[a-z0-9]+(\/[a-z0-9.]+)?$/, "platform must be os/arch[/variant]")
      .optional(),
    size: SizeString.optional().openapi({ description: 'Base memory, default "1GB"' }),
    hotplug_size: SizeString.optional(),
    overlay_size: SizeString.optional().openapi({
      description: 'Writable overlay, default "10GB"',
    }),
    disk_io_bps: RateString.optional(),
    vcpus: z.number().int().min(1).max(256).optional().openapi({ description: "default 2" }),
    env: Env.optional(),
    tags: Tags.optional(),
    network: CreateInstanceNetwork.optional(),
    volumes: z.array(VolumeMount).max(16).optional(),
    hypervisor: Hypervisor.optional(),
    entrypoint: z.array(z.string().max(4096)).max(256).optional(),
    cmd: z.array(z.string().max(4096)).max(256).optional(),
    skip_kernel_headers: z.boolean().optional(),
    skip_guest_agent: z.boolean().optional(),
    // Accepted so that requests carrying them get a clear 501 instead of being silently ignored.
    devices: z.array(z.string()).optional(),
    gpu: z.unknown().optional(),
    credentials: z.unknown().optional(),
    snapshot_policy: z.unknown().optional(),
    auto_standby: z.unknown().optional(),
    health_check: z.unknown().optional(),
    restart_policy: z.unknown().optional(),
    ttl: z.unknown().optional(),
    expires_at: z.unknown().optional(),
  })
  .superRefine(metadataWithinLimit)
  .openapi("CreateInstanceRequest");
export type CreateInstanceRequest = z.infer<typeof CreateInstanceRequest>;

export const ForkInstanceRequest = z
  .object({
    name: InstanceName,
    from_running: z.boolean().default(false),
    target_state: ForkTargetState.optional(),
  })
  .openapi("ForkInstanceRequest");
export type ForkInstanceRequest = z.infer<typeof ForkInstanceRequest>;

export const StartInstanceRequest = z
  .object({
    entrypoint: z.array(z.string().max(4096)).max(256).optional(),
    cmd: z.array(z.string().max(4096)).max(256).optional(),
  })
  .superRefine(metadataWithinLimit)
  .openapi("StartInstanceRequest");
export type StartInstanceRequest = z.infer<typeof StartInstanceRequest>;

export const StandbyInstanceRequest = z
  .object({
    compression: z.unknown().optional(),
    compression_delay: z.string().optional(),
  })
  .openapi("StandbyInstanceRequest");
export type StandbyInstanceRequest = z.infer<typeof StandbyInstanceRequest>;

export const WaitForStateResponse = z
  .object({
    state: InstanceState,
    state_error: z.string().nullable().optional(),
    timed_out: z.boolean(),
  })
  .openapi("WaitForStateResponse");
export type WaitForStateResponse = z.infer<typeof WaitForStateResponse>;

/** Hypeman's Health, plus whether the database answers (503 with `unavailable` when not). */
export const Health = z
  .object({
    status: z.enum(["ok", "unavailable"]),
    database: z.enum(["up", "down"]).optional(),
  })
  .openapi("Health");

/** GET /images: an image some connected host can boot, in the reference spec's shape. */
export const ImageStatus = z.enum(["pending", "pulling", "converting", "ready", "failed"]);
export type ImageStatus = z.infer<typeof ImageStatus>;

export const Image = z
  .object({
    name: z.string().openapi({ example: "docker.io/library/alpine:latest" }),
    digest: z.string().openapi({
      example: "sha256:…",
      description: 'Resolved manifest digest ("" until the pull resolves it)',
    }),
    platform: z.string().optional(),
    status: ImageStatus,
    queue_position: z.number().int().nullable().optional(),
    error: z.string().nullable().optional(),
    size_bytes: z.number().int().nullable().optional(),
    entrypoint: z.array(z.string()).nullable().optional(),
    cmd: z.array(z.string()).nullable().optional(),
    env: z.record(z.string(), z.string()).optional(),
    working_dir: z.string().nullable().optional(),
    tags: z.record(z.string(), z.string()).optional(),
    /** Not in Hypeman's schema: how far the pull has got. */
    progress: z
      .object({ bytes_done: z.number().int(), bytes_total: z.number().int() })
      .nullable()
      .optional()
      .openapi({
        description:
          "Offshoot extension: compressed layer bytes fetched and to fetch (layers the host already held are not counted); null unless pulling or converting",
      }),
    created_at: z.string().openapi({ format: "date-time" }),
  })
  .openapi("Image");
export type Image = z.infer<typeof Image>;

/** Borrowed for one pull: kept in memory for the pull only, never stored or logged. */
export const PushCredentials = z
  .object({
    username: z.string().max(1024).optional(),
    password: z.string().max(8192).optional(),
    registry_token: z.string().max(16384).optional(),
  })
  .openapi("PushCredentials");
export type PushCredentials = z.infer<typeof PushCredentials>;

export const CreateImageRequest = z
  .object({
    name: z.string().max(1024).openapi({ example: "docker.io/library/nginx:latest" }),
    credentials: PushCredentials.optional(),
    platform: z.string().max(64).optional().openapi({ example: "linux/amd64" }),
    tags: Tags.optional(),
  })
  .openapi("CreateImageRequest");
export type CreateImageRequest = z.infer<typeof CreateImageRequest>;

/** GET /instances/{id}/stat: a path in the guest, as Hypeman's guest agent reports it. */
export const PathInfo = z
  .object({
    exists: z.boolean(),
    is_dir: z.boolean().optional(),
    is_file: z.boolean().optional(),
    is_symlink: z.boolean().optional().openapi({ description: "Only set when follow_links=false" }),
    link_target: z.string().nullable().optional(),
    mode: z.number().int().optional().openapi({ description: "Permission bits", example: 420 }),
    size: z.number().int().optional(),
    error: z
      .string()
      .nullable()
      .optional()
      .openapi({ description: "Why the path could not be examined (exists is false)" }),
  })
  .openapi("PathInfo");
export type PathInfo = z.infer<typeof PathInfo>;

/** GET /instances/{id}/stats: what the instance's VMM costs now. */
export const InstanceStats = z
  .object({
    instance_id: z.string(),
    instance_name: z.string(),
    cpu_seconds: z.number().openapi({ description: "CPU time of the VMM process, seconds" }),
    memory_rss_bytes: z.number().int(),
    memory_vms_bytes: z.number().int(),
    network_rx_bytes: z
      .number()
      .int()
      .openapi({ description: "Bytes the guest received (its TAP)" }),
    network_tx_bytes: z.number().int().openapi({ description: "Bytes the guest sent (its TAP)" }),
    allocated_vcpus: z.number().int(),
    allocated_memory_bytes: z.number().int(),
    memory_utilization_ratio: z.number().nullable().optional(),
  })
  .openapi("InstanceStats");
export type InstanceStats = z.infer<typeof InstanceStats>;

/** POST /auth/stream-token: a single-use token opening one exec or cp WebSocket (`?token=`). */
export const StreamToken = z
  .object({ token: z.string(), expires_at: z.string() })
  .openapi("StreamToken");
export type StreamToken = z.infer<typeof StreamToken>;

// ---- snapshots ----------------------------------------------------------------------------

export const SnapshotKind = z.enum(["Standby", "Stopped"]).openapi("SnapshotKind");
export type SnapshotKind = z.infer<typeof SnapshotKind>;

export const SnapshotCompression = z.enum(["zstd", "lz4"]);
export type SnapshotCompression = z.infer<typeof SnapshotCompression>;
/** Levels by algorithm (Hypeman's ranges) and the level used when none is given. */
export const COMPRESSION_LEVELS: Record<
  SnapshotCompression,
  { min: number; max: number; default: number }
> = {
  zstd: { min: 1, max: 19, default: 1 },
  lz4: { min: 0, max: 9, default: 0 },
};

export const SnapshotCompressionConfig = z
  .object({
    enabled: z.boolean(),
    algorithm: SnapshotCompression.optional(),
    level: z.number().int().min(0).max(19).optional(),
  })
  .superRefine((c, ctx) => {
    if (!c.enabled || c.level === undefined) return;
    const algorithm = c.algorithm ?? "zstd";
    const { min, max } = COMPRESSION_LEVELS[algorithm];
    if (c.level < min || c.level > max) {
      ctx.addIssue({
        code: "custom",
        path: ["level"],
        message: `${algorithm} level must be ${min}-${max}`,
      });
    }
  })
  .openapi("SnapshotCompressionConfig");
export type SnapshotCompressionConfig = z.infer<typeof SnapshotCompressionConfig>;

export const Snapshot = z
  .object({
    id: z.string(),
    name: z.string().nullable().optional(),
    kind: SnapshotKind,
    tags: z.record(z.string(), z.string()).optional(),
    source_instance_id: z.string(),
    source_instance_name: z.string(),
    source_hypervisor: Hypervisor,
    created_at: z.string().openapi({ format: "date-time" }),
    size_bytes: z.number().int().openapi({
      description:
        "Bytes the snapshot's files hold on its host: memory, device state and disk (blocks shared with its source or its forks are counted too)",
    }),
    compression_state: z.enum(["none", "compressing", "compressed", "error"]).optional(),
    compression_error: z.string().nullable().optional(),
    compression: SnapshotCompressionConfig.optional(),
    compressed_size_bytes: z.number().int().nullable().optional(),
    uncompressed_size_bytes: z.number().int().nullable().optional(),
  })
  .openapi("Snapshot");
export type Snapshot = z.infer<typeof Snapshot>;

export const CreateSnapshotRequest = z
  .object({
    kind: SnapshotKind,
    name: InstanceName.optional(),
    tags: Tags.optional(),
    compression: SnapshotCompressionConfig.optional(),
  })
  .openapi("CreateSnapshotRequest");
export type CreateSnapshotRequest = z.infer<typeof CreateSnapshotRequest>;

export const ForkSnapshotRequest = z
  .object({
    name: InstanceName,
    target_state: ForkTargetState.optional(),
    target_hypervisor: Hypervisor.optional(),
  })
  .openapi("ForkSnapshotRequest");
export type ForkSnapshotRequest = z.infer<typeof ForkSnapshotRequest>;

export const RestoreSnapshotRequest = z
  .object({
    target_state: ForkTargetState.optional(),
    target_hypervisor: Hypervisor.optional(),
  })
  .openapi("RestoreSnapshotRequest");
export type RestoreSnapshotRequest = z.infer<typeof RestoreSnapshotRequest>;

/** A Go duration ("24h", "1m30s"), checked when parsed by the service. */
const GoDuration = z
  .string()
  .max(32)
  .regex(/^(\d+(\.\d+)?(ms|s|m|h))+$/, 'expected a duration like "30m", "24h" or "1h30m"');

export const SnapshotScheduleRetention = z
  .object({
    max_count: z.number().int().min(0).max(10_000).optional(),
    max_age: GoDuration.optional(),
  })
  .openapi("SnapshotScheduleRetention");
export type SnapshotScheduleRetention = z.infer<typeof SnapshotScheduleRetention>;

export const SetSnapshotScheduleRequest = z
  .object({
    interval: GoDuration,
    name_prefix: z
      .string()
      .max(47, "name_prefix must be at most 47 characters")
      .regex(
        NAME_PATTERN,
        "name_prefix must be lowercase letters, digits and dashes, and cannot start or end with a dash",
      )
      .nullable()
      .optional(),
    metadata: Tags.optional(),
    retention: SnapshotScheduleRetention,
  })
  .openapi("SetSnapshotScheduleRequest");
export type SetSnapshotScheduleRequest = z.infer<typeof SetSnapshotScheduleRequest>;

export const SnapshotSchedule = z
  .object({
    instance_id: z.string(),
    interval: z.string(),
    name_prefix: z.string().nullable().optional(),
    metadata: z.record(z.string(), z.string()).optional(),
    retention: SnapshotScheduleRetention,
    next_run_at: z.string().openapi({ format: "date-time" }),
    last_run_at: z.string().nullable().optional().openapi({ format: "date-time" }),
    last_snapshot_id: z.string().nullable().optional(),
    last_error: z.string().nullable().optional(),
    created_at: z.string().openapi({ format: "date-time" }),
    updated_at: z.string().openapi({ format: "date-time" }),
  })
  .openapi("SnapshotSchedule");
export type SnapshotSchedule = z.infer<typeof SnapshotSchedule>;

// ---- hosts ---------------------------------------------------------------------------------

export const HostView = z
  .object({
    id: z.string(),
    name: z.string(),
    connected: z.boolean().openapi({
      description: "Its agent said hello and was heard from within the host grace period",
    }),
    last_heartbeat_at: z.string().nullable().openapi({ format: "date-time" }),
    driver: z.string().nullable(),
    vcpus: z.object({
      total: z
        .number()
        .int()
        .openapi({ description: "What the host may promise (overcommit included)" }),
      allocated: z.number().int().openapi({ description: "Held by instances of every tenant" }),
      free: z.number().int(),
    }),
    memory: z.object({
      total_bytes: z
        .number()
        .int()
        .openapi({ description: "What the host may promise (overcommit included)" }),
      allocated_bytes: z.number().int().openapi({
        description:
          "Charged to instances of every tenant (a fork sharing its memory base counts what it really costs)",
      }),
      free_bytes: z.number().int(),
      available_bytes: z.number().int().nullable().openapi({
        description: "MemAvailable as the host last reported it",
      }),
    }),
    instances: z.number().int().openapi({ description: "The tenant's instances on the host" }),
  })
  .openapi("Host", {
    description:
      "A host as a tenant sees it: whether it is connected, and its capacity (an extension of Hypeman's API)",
  });
export type HostView = z.infer<typeof HostView>;

// ---- events ---------------------------------------------------------------------------------

export const TenantEvent = z
  .object({
    id: z.number().int().openapi({ description: "Increasing; resume after it with Last-Event-ID" }),
    type: z.string().openapi({
      description:
        "instance.created, instance.state (data: from, to, cause), instance.deleted (data: reason)",
      example: "instance.state",
    }),
    instance_id: z.string().nullable(),
    created_at: z.string().openapi({ format: "date-time" }),
    data: z.record(z.string(), z.unknown()),
    instance: Instance.nullable().optional().openapi({
      description:
        "The instance as it is when the event is sent (not as it was then); null once it is deleted",
    }),
  })
  .openapi("Event");
export type TenantEvent = z.infer<typeof TenantEvent>;
