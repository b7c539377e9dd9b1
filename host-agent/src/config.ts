// The agent's environment, checked once at start-up: the first wrong value stops the agent with
// a message naming the variable, rather than failing later in the middle of a command.
import os from "node:os";
import path from "node:path";
import {
  AGENT_PATH,
  ErrorCode,
  normalizeImageRef,
  OperationKind,
  parseSize,
} from "@offshoot/shared";
import { z } from "zod";
import { NETNS_NAME } from "./network/netns.ts";

const LatencyPerKind = z.partialRecord(OperationKind, z.number().nonnegative());
const FailPerKind = z.partialRecord(OperationKind, ErrorCode);

const POSITIVE_INT = "must be a positive integer";

export type SimLatency = number | Partial<Record<OperationKind, number>>;

/** Parses JSON from a variable and validates it, reporting the first problem with an example. */
function parseJson<T extends z.ZodType>(
  s: string,
  ctx: z.core.$RefinementCtx,
  schema: T,
  example: string,
): z.output<T> {
  let value: unknown;
  try {
    value = JSON.parse(s);
  } catch {
    ctx.addIssue({ code: "custom", message: `expected JSON like ${example}` });
    return z.NEVER;
  }
  const parsed = schema.safeParse(value);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0];
  const where = issue?.path.length ? `${issue.path.join(".")}: ` : "";
  ctx.addIssue({
    code: "custom",
    message: `${where}${issue?.message ?? "invalid"} (e.g. ${example})`,
  });
  return z.NEVER;
}

/** A whole number above 0, from the environment's text. */
const positiveInt = () =>
  z.coerce.number({ error: POSITIVE_INT }).int(POSITIVE_INT).positive(POSITIVE_INT);

/** A size setting ("16GB"), greater than 0; `fallback` when unset. */
const size = (fallback: () => number) =>
  z
    .string()
    .optional()
    .transform((s, ctx) => {
      if (s === undefined) return fallback();
      try {
        const bytes = parseSize(s);
        if (bytes > 0) return bytes;
        ctx.addIssue({ code: "custom", message: "must be greater than 0" });
      } catch (e) {
        ctx.addIssue({ code: "custom", message: e instanceof Error ? e.message : String(e) });
      }
      return z.NEVER;
    });

const Env = z.object({
  // Base URL of the control plane; the agent dials `${url}/agent/v1/connect` (http→ws, https→wss).
  // Several, comma-separated (one per replica): the agent moves to the next after a failure.
  CONTROL_PLANE_URL: z
    .string({ error: "is required, e.g. http://127.0.0.1:8080" })
    .transform((s) =>
      s
        .split(",")
        .map((u) => u.trim())
        .filter(Boolean),
    )
    .pipe(
      z
        .array(
          z.string().regex(/^(https?|wss?):\/\/[^\s/]+/, "must be an http(s):// or ws(s):// URL"),
        )
        .min(1, "is required, e.g. http://127.0.0.1:8080"),
    ),
  // The secret this host authenticates with (sent as `Authorization: Bearer …`).
  HOST_TOKEN: z.string({ error: "is required" }).min(1, "is required"),
  // Journal and driver state; must survive agent restarts and belong to one agent only.
  AGENT_DATA_DIR: z.string().min(1).default(".data/agent"),
  // The name this host reports in hello; operators see it in the control plane.
  AGENT_HOST_NAME: z.string().min(1).default(os.hostname()),
  // Hypervisor driver. Required, so that the simulator never runs by accident.
  AGENT_DRIVER: z
    .string({
      error: 'is required: "qemu" (real VMs) or "sim" (simulated, for tests and benchmarks)',
    })
    .pipe(
      z.enum(["sim", "qemu"], {
        error: (i) => `"${String(i.input)}" is not available; use "qemu" or "sim"`,
      }),
    ),
  // qemu: hardware acceleration. auto = KVM only if a bounded test boot under it reaches init.
  AGENT_ACCEL: z.enum(["auto", "kvm", "tcg"]).default("auto"),
  // qemu: the guest kernel and initramfs, as built by scripts/vm-assets.ts (assets.json there).
  AGENT_VM_ASSETS: z.string().min(1).default(".data/vm-assets"),
  // qemu: the network namespace guests' bridge, TAPs, NAT rules and QEMU processes live in
  // (it must exist: `ip netns add NAME`). Empty: the agent's own namespace, as on a real host.
  AGENT_NETNS: z
    .string()
    .refine(
      (v) => v === "" || NETNS_NAME.test(v),
      "must be a network namespace name (1–64 of letters, digits, _.-, not starting with . _ -)",
    )
    .default(""),
  // qemu: OCI image layouts (directories or tarballs) to import at start, comma-separated, each
  // `PATH` (named by its ref.name annotation) or `NAME=PATH`.
  AGENT_IMAGES: z
    .string()
    .default("")
    .transform((s, ctx) =>
      s
        .split(",")
        .map((x) => x.trim())
        .filter(Boolean)
        .map((item) => {
          const eq = item.indexOf("=");
          const name = eq > 0 ? item.slice(0, eq) : undefined;
          const source = path.resolve(eq > 0 ? item.slice(eq + 1) : item);
          if (name !== undefined && normalizeImageRef(name) === undefined) {
            ctx.addIssue({ code: "custom", message: `"${name}" is not an image reference` });
          }
          return { source, ...(name === undefined ? {} : { name }) };
        }),
    ),
  // Image pulls: the largest layer accepted (compressed size, e.g. "8GB").
  AGENT_MAX_LAYER_SIZE: size(() => 8 * 1024 ** 3),
  // Image pulls: how long a registry may stay silent (no response, no byte) before the pull
  // fails, in ms.
  AGENT_REGISTRY_TIMEOUT_MS: positiveInt().default(30_000),
  // Image pulls: registries (host:port, comma-separated) reached over plain HTTP. Loopback
  // registries always are, as in Docker.
  AGENT_INSECURE_REGISTRIES: z
    .string()
    .default("")
    .transform((s) =>
      s
        .split(",")
        .map((x) => x.trim())
        .filter(Boolean),
    ),
  // What image root filesystems are built as: "erofs" (mkfs.erofs, Debian's erofs-utils) or
  // "ext4" (mkfs.ext4 -d). BENCHMARKS.md compares them: erofs builds faster and is smaller,
  // boots are alike.
  AGENT_ROOTFS_FORMAT: z.enum(["ext4", "erofs"]).default("erofs"),
  // Pulled images' layers and root filesystems kept on this host, e.g. "50GB": past it, the
  // least recently used images no instance boots are removed after each pull.
  AGENT_IMAGE_CACHE_SIZE: size(() => 50 * 1024 ** 3),
  // Image pulls run at once on this host; more wait in order (their images are "pending").
  AGENT_PULL_CONCURRENCY: positiveInt().default(2),
  // QEMU: guests launched at once (boots, restores, forks brought to Running); more wait in
  // order. Most of a restore is waiting for the guest to confirm its identity, so this is well
  // above the cores (BENCHMARKS.md: 25 forks of a snapshot took 44 s two at a time, 12 s all at
  // once); it bounds a burst that would starve every launch.
  AGENT_LAUNCH_CONCURRENCY: positiveInt().default(16),
  // vCPUs this host offers to instances.
  AGENT_VCPUS: positiveInt().default(os.cpus().length),
  // Memory this host offers to instances, e.g. "16GB".
  AGENT_MEMORY: size(() => os.totalmem()),
  // Stop when the process with this pid is no longer this agent's parent (`npm start` sets it,
  // so that its agent cannot outlive it). Unset on real hosts.
  AGENT_PARENT_PID: positiveInt().optional(),
  // Sim only: where the simulated hypervisor keeps its instances (default <AGENT_DATA_DIR>/sim).
  // Its files stand in for hypervisor processes: they must outlive the agent, not the machine,
  // so a tmpfs such as /dev/shm will do, as /run does for a real hypervisor's runtime state.
  SIM_STATE_DIR: z.string().min(1).optional(),
  // Sim only: delay per operation in ms, one number for every kind or JSON per kind.
  SIM_LATENCY_MS: z
    .string()
    .default("0")
    .transform((s, ctx): SimLatency => {
      if (/^\s*\d+(\.\d+)?\s*$/.test(s)) return Number(s);
      return parseJson(s, ctx, LatencyPerKind, '{"fork":2000,"create":50}');
    }),
  // Sim only: fault injection; {"fork":"insufficient_resources"} makes every fork fail with that
  // code after doing and undoing its steps.
  SIM_FAIL: z
    .string()
    .default("{}")
    .transform((s, ctx) => parseJson(s, ctx, FailPerKind, '{"restore":"internal_error"}')),
  // Sim only: append {command_id, kind, instance_id} to <data>/sim-exec.log per executed op.
  SIM_EXEC_LOG: z
    .enum(["1", "0", "true", "false"], { error: 'must be "1", "0", "true" or "false"' })
    .default("1")
    .transform((v) => v === "1" || v === "true"),
});

export interface SimConfig {
  /** Absolute; undefined: `<dataDir>/sim`. */
  stateDir?: string;
  latencyMs: SimLatency;
  fail: Partial<Record<OperationKind, ErrorCode>>;
  execLog: boolean;
}

export interface AgentConfig {
  /** The WebSocket URLs the agent dials, in turn after each failure. */
  connectUrls: string[];
  hostToken: string;
  /** Absolute. */
  dataDir: string;
  hostName: string;
  driver: "sim" | "qemu";
  capacity: { vcpus: number; memory_bytes: number };
  /** Stop when this process is no longer the agent's parent. */
  parentPid?: number;
  sim: SimConfig;
  pulls: {
    maxLayerBytes: number;
    idleTimeoutMs: number;
    insecure: string[];
    concurrency: number;
    cacheBytes: number;
    rootfsFormat: "ext4" | "erofs";
  };
  qemu: {
    accel: "auto" | "kvm" | "tcg";
    assetsDir: string;
    images: Array<{ source: string; name?: string }>;
    /** null: the agent's own network namespace. */
    netns: string | null;
    launchConcurrency: number;
  };
}

export class ConfigError extends Error {}

/** http://cp:8080/ → ws://cp:8080/agent/v1/connect */
export function connectUrl(base: string): string {
  const url = new URL(base.replace(/^http/, "ws"));
  url.pathname = `${url.pathname.replace(/\/+$/, "")}${AGENT_PATH}`;
  return url.toString();
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): AgentConfig {
  const parsed = Env.safeParse(env);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new ConfigError(
      `${String(issue?.path[0] ?? "environment")}: ${issue?.message ?? "invalid"}`,
    );
  }
  const e = parsed.data;
  return {
    connectUrls: e.CONTROL_PLANE_URL.map(connectUrl),
    hostToken: e.HOST_TOKEN,
    dataDir: path.resolve(e.AGENT_DATA_DIR),
    hostName: e.AGENT_HOST_NAME,
    driver: e.AGENT_DRIVER,
    capacity: { vcpus: e.AGENT_VCPUS, memory_bytes: e.AGENT_MEMORY },
    ...(e.AGENT_PARENT_PID !== undefined && { parentPid: e.AGENT_PARENT_PID }),
    sim: {
      ...(e.SIM_STATE_DIR ? { stateDir: path.resolve(e.SIM_STATE_DIR) } : {}),
      latencyMs: e.SIM_LATENCY_MS,
      fail: e.SIM_FAIL,
      execLog: e.SIM_EXEC_LOG,
    },
    pulls: {
      maxLayerBytes: e.AGENT_MAX_LAYER_SIZE,
      idleTimeoutMs: e.AGENT_REGISTRY_TIMEOUT_MS,
      insecure: e.AGENT_INSECURE_REGISTRIES,
      concurrency: e.AGENT_PULL_CONCURRENCY,
      cacheBytes: e.AGENT_IMAGE_CACHE_SIZE,
      rootfsFormat: e.AGENT_ROOTFS_FORMAT,
    },
    qemu: {
      accel: e.AGENT_ACCEL,
      assetsDir: path.resolve(e.AGENT_VM_ASSETS),
      images: e.AGENT_IMAGES,
      netns: e.AGENT_NETNS || null,
      launchConcurrency: e.AGENT_LAUNCH_CONCURRENCY,
    },
  };
}
