import { z } from "zod";

const Env = z.object({
  /** HTTP port for the REST API, the console and the agents' WebSocket. */
  PORT: z.coerce.number().int().min(0).max(65535).default(8080),
  /** Address to bind. */
  HOST: z.string().default("0.0.0.0"),
  /** A Postgres server (postgres://…). Unset: embedded PGlite under DATA_DIR. */
  DATABASE_URL: z.string().url().optional(),
  /** Where PGlite keeps its files when DATABASE_URL is unset. */
  DATA_DIR: z.string().default(".data"),
  /** Ensure this API key exists for the default tenant (the seed's curl examples use it). */
  HYPEMAN_API_KEY: z.string().min(16, "HYPEMAN_API_KEY must be at least 16 characters").optional(),
  /** How often agents heartbeat. */
  HEARTBEAT_MS: z.coerce.number().int().min(50).default(5000),
  /** A host silent this long has its instances shown as Unknown. */
  HOST_GRACE_MS: z.coerce.number().int().min(100).default(15_000),
  /** Longest an API request waits for a host command before answering 504. */
  COMMAND_TIMEOUT_MS: z.coerce.number().int().min(100).default(120_000),
  /** The largest tar.gz POST /volumes/from-archive takes, in bytes (held in Postgres until its
   * host has unpacked it). */
  VOLUME_ARCHIVE_MAX_BYTES: z.coerce
    .number()
    .int()
    .min(1024)
    .max(4 * 1024 ** 3)
    .default(256 * 1024 * 1024),
  /** vCPUs a host may be promised per vCPU it offers: they are time-shared, as on Hypeman's and
   * Fly's hosts. 1 = never overcommitted. */
  VCPU_OVERCOMMIT: z.coerce.number().min(1).max(64).default(4),
  /** Memory a host may be promised per byte it offers. Guest memory is not shared, so 1 (never
   * overcommitted) unless an operator knows better. */
  MEMORY_OVERCOMMIT: z.coerce.number().min(1).max(4).default(1),
  /** How often fork flows left pending (by a replica that died mid-flow, or a previous run of
   * this one) are picked up and driven on. */
  FORK_RESUME_MS: z.coerce.number().int().min(100).default(5_000),
  /** How long one minute of a snapshot schedule lasts (interval, max_age): 60,000 in
   * production; tests shorten it to see schedules run within seconds. */
  SNAPSHOT_SCHEDULE_MINUTE_MS: z.coerce.number().int().min(1).max(60_000).default(60_000),
  /** How often each Node replica looks for due snapshot schedules (Workers: the cron's minute). */
  SNAPSHOT_SCHEDULE_TICK_MS: z.coerce.number().int().min(50).default(5_000),
  /** How long an API key found valid is trusted without asking the database again: a revoked
   * key keeps working for up to this long on a replica that has just seen it. 0: no cache. */
  API_KEY_CACHE_MS: z.coerce.number().int().min(0).default(5_000),
  /** Where other replicas reach this one for a stream to an agent held here (exec, cp, stat;
   * the hop endpoint, /internal/v1/stream-hop). Unset: http://127.0.0.1:PORT, which serves
   * replicas on one machine. */
  REPLICA_URL: z.string().url().optional(),
});
export type Env = z.infer<typeof Env>;

/** loadEnv() for a process's start: a wrong setting is one line on stderr and exit code 2, not
 * a stack trace. */
export function loadEnvOrExit(): Env {
  try {
    return loadEnv();
  } catch (e) {
    process.stderr.write(`offshoot: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(2);
  }
}

export function loadEnv(source: NodeJS.ProcessEnv = process.env): Env {
  const parsed = Env.safeParse(source);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new Error(`invalid environment: ${issue?.path.join(".")}: ${issue?.message}`);
  }
  return parsed.data;
}
