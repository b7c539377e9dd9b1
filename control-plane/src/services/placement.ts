import {
  formatSize,
  HostUnavailableError,
  type Hypervisor,
  InsufficientResourcesError,
  NotSupportedError,
  RESIDENT,
} from "@offshoot/shared";
import { and, eq, gt, inArray, ne, not, or, type SQL, sql } from "drizzle-orm";
import { selectRows, type Tx } from "../db/client.ts";
import { hosts, instances, operations } from "../db/schema/index.ts";
import type { Env } from "../env.ts";
import { forkEndsFlowSql } from "./operations.ts";

export type HostRow = typeof hosts.$inferSelect;

/** What an instance's memory counts for on its host: what the host reported it costs, else its
 * size (see usage). */
const charged = sql`coalesce(${instances.memoryChargeBytes}, ${instances.memoryBytes} + ${instances.hotplugBytes})`;

export interface Need {
  vcpus: number;
  memoryBytes: number;
}

/** Connected: its agent said hello and was heard from within `graceMs` (null: status only,
 * see hostGrace). */
export const online = (graceMs: number | null) =>
  graceMs === null
    ? eq(hosts.status, "online")
    : and(
        eq(hosts.status, "online"),
        gt(hosts.lastSeenAt, sql`now() - make_interval(secs => ${graceMs / 1000})`),
      );

/**
 * vCPUs and memory held on a host: resident instances, plus ones being started or restored,
 * plus sources of from_running forks (in Standby for a moment, and restored after). A guest's
 * memory counts what its host last reported it costs (memory_charge_bytes: the private pages of
 * a fork mapping a shared memory base), else its size.
 */
export async function usage(tx: Tx, hostId: string | SQL, exclude?: string | SQL): Promise<Need> {
  const pending = and(eq(operations.hostId, hostId), eq(operations.status, "pending"));
  const starting = tx
    .select({ id: operations.instanceId })
    .from(operations)
    .where(and(pending, inArray(operations.kind, ["start", "restore"])))
    .union(
      tx
        .select({ id: operations.sourceInstanceId })
        .from(operations)
        .where(
          and(pending, eq(operations.kind, "fork_flow"), not(forkEndsFlowSql(operations.payload))),
        ),
    );
  const [row] = await tx
    .select({
      vcpus: sql<string>`coalesce(sum(${instances.vcpus}), 0)`,
      memoryBytes: sql<string>`coalesce(sum(${charged}), 0)`,
    })
    .from(instances)
    .where(
      and(
        eq(instances.hostId, hostId),
        exclude ? ne(instances.id, exclude) : undefined,
        or(inArray(instances.state, [...RESIDENT]), inArray(instances.id, starting)),
      ),
    );
  return { vcpus: Number(row?.vcpus ?? 0), memoryBytes: Number(row?.memoryBytes ?? 0) };
}

/**
 * How far a host's vCPUs and memory may be promised beyond what it has (VCPU_OVERCOMMIT,
 * MEMORY_OVERCOMMIT). vCPUs are time-shared, so a host can run more of them than it has cores;
 * memory is not, so by default it is promised only as far as it exists.
 */
export interface Overcommit {
  vcpus: number;
  memory: number;
}

export const overcommitOf = (env: Pick<Env, "VCPU_OVERCOMMIT" | "MEMORY_OVERCOMMIT">) => ({
  vcpus: env.VCPU_OVERCOMMIT,
  memory: env.MEMORY_OVERCOMMIT,
});

/** What a host may hold, overcommit included. */
export const capacity = (host: HostRow, over: Overcommit): Need => ({
  vcpus: Math.floor(host.vcpus * over.vcpus),
  memoryBytes: Math.floor(host.memoryBytes * over.memory),
});

/** Why `need` does not fit on the host, or undefined when it does: what its instances are
 * charged against what it offers (overcommit included), and — whatever the charges say — the
 * memory the host last reported available, less a reserve: a host that is truly full refuses. */
function shortfall(host: HostRow, used: Need, need: Need, over: Overcommit): string | undefined {
  const cap = capacity(host, over);
  if (
    used.vcpus + need.vcpus > cap.vcpus ||
    used.memoryBytes + need.memoryBytes > cap.memoryBytes
  ) {
    return `host ${host.name} has ${Math.max(0, cap.vcpus - used.vcpus)} vCPUs and ${formatSize(Math.max(0, cap.memoryBytes - used.memoryBytes))} free; ${need.vcpus} vCPUs and ${formatSize(need.memoryBytes)} needed`;
  }
  const avail = availableNow(host);
  if (avail !== null && need.memoryBytes > 0 && avail - reserveOf(host) < need.memoryBytes) {
    return `host ${host.name} has ${formatSize(Math.max(0, avail))} of memory available and keeps ${formatSize(reserveOf(host))} in reserve; ${formatSize(need.memoryBytes)} needed`;
  }
  return undefined;
}

const fits = (host: HostRow, used: Need, need: Need, over: Overcommit) =>
  shortfall(host, used, need, over) === undefined;

/**
 * Picks a connected host with room for `need` and locks its row for the rest of the
 * transaction, so two placements cannot both take the last slot. Prefers `prefer`'s hosts,
 * then the host with the most free memory (spreads load). Free capacity is estimated for all hosts in one query,
 * then re-checked under the lock of the chosen host.
 */
export async function placeInstance(
  tx: Tx,
  graceMs: number | null,
  over: Overcommit,
  need: Need,
  hypervisor: Hypervisor | undefined,
  requires: (host: HostRow) => string | undefined,
  /** Hosts for which this holds come first, whatever their free memory. */
  prefer?: (host: HostRow) => boolean,
): Promise<{ host: HostRow; hypervisor: Hypervisor }> {
  const candidates = await tx.select().from(hosts).where(online(graceMs));
  if (candidates.length === 0) {
    throw new InsufficientResourcesError("no host is connected to run instances");
  }
  const capable = candidates.filter(
    (h) => (!hypervisor || h.capabilities?.hypervisors.includes(hypervisor)) && !requires(h),
  );
  if (capable.length === 0) {
    const reason = candidates.map(requires).find(Boolean);
    throw new NotSupportedError(
      reason ?? `no connected host supports hypervisor ${hypervisor ?? "(default)"}`,
    );
  }
  const used = await usageByHost(
    tx,
    capable.map((h) => h.id),
  );
  const free = (h: HostRow) => h.memoryBytes - (used.get(h.id)?.memoryBytes ?? 0);
  const preferred = (h: HostRow) => Number(prefer?.(h) ?? false);
  const ranked = capable
    .filter((h) => fits(h, used.get(h.id) ?? { vcpus: 0, memoryBytes: 0 }, need, over))
    .sort((a, b) => preferred(b) - preferred(a) || free(b) - free(a));
  for (const h of ranked) {
    const [locked] = await tx.select().from(hosts).where(eq(hosts.id, h.id)).for("update");
    if (!locked) continue;
    if (fits(locked, await usage(tx, h.id), need, over)) {
      const hv = hypervisor ?? locked.capabilities?.hypervisors[0];
      if (hv) return { host: locked, hypervisor: hv };
    }
  }
  const best = [...capable].sort((a, b) => free(b) - free(a))[0];
  throw new InsufficientResourcesError(
    best
      ? `no host has room: ${shortfall(best, used.get(best.id) ?? { vcpus: 0, memoryBytes: 0 }, need, over) ?? "it filled meanwhile"}`
      : "no host has room",
  );
}

/** Resident use per host, for many hosts in one query (an estimate: nothing is locked). */
async function usageByHost(tx: Tx, hostIds: string[]): Promise<Map<string, Need>> {
  const rows = await tx
    .select({
      hostId: instances.hostId,
      vcpus: sql<string>`sum(${instances.vcpus})`,
      memoryBytes: sql<string>`sum(${charged})`,
    })
    .from(instances)
    .where(and(inArray(instances.hostId, hostIds), inArray(instances.state, [...RESIDENT])))
    .groupBy(instances.hostId);
  return new Map(
    rows.map((r) => [r.hostId, { vcpus: Number(r.vcpus), memoryBytes: Number(r.memoryBytes) }]),
  );
}

/** Locks the host's row if the host is connected. `hostId` may be a subquery (see exactly()
 * in instances/resolve.ts). */
export async function lockOnlineHost(
  tx: Tx,
  graceMs: number | null,
  hostId: string | SQL,
): Promise<HostRow | undefined> {
  const [host] = await selectRows(
    tx,
    hosts,
    sql`select to_jsonb(hosts.*) as row from ${hosts} where ${hosts.id} = ${hostId} and ${online(graceMs)} for update`,
  );
  return host;
}

/** Checks an instance's host, as lockOnlineHost() locked it (or found it not connected): it must
 * be connected and have room for `need`. `used`: what usage() said after that lock, if the
 * caller asked it already. */
export async function admitLocked(
  tx: Tx,
  host: HostRow | undefined,
  hostId: string,
  need: Need | undefined,
  over: Overcommit,
  excludeInstanceId?: string,
  used?: Need,
): Promise<HostRow> {
  if (!host) {
    const [h] = await tx.select({ name: hosts.name }).from(hosts).where(eq(hosts.id, hostId));
    throw new HostUnavailableError(`host ${h?.name ?? hostId} is not connected`);
  }
  if (need) {
    used ??= await usage(tx, hostId, excludeInstanceId);
    const short = shortfall(host, used, need, over);
    if (short) throw new InsufficientResourcesError(short);
  }
  return host;
}

/** A memory report older than this is not trusted for the host's floor. */
const MEMORY_REPORT_FRESH_MS = 60_000;

/** What the host last said it has available, if it said so lately. */
function availableNow(host: HostRow): number | null {
  if (host.memoryAvailableBytes === null || host.memoryReportedAt === null) return null;
  if (Date.now() - new Date(host.memoryReportedAt).getTime() > MEMORY_REPORT_FRESH_MS) return null;
  return host.memoryAvailableBytes;
}

/** Memory a host keeps free whatever the charges say: 5 % of what it offers, at least 256 MiB. */
const reserveOf = (host: HostRow) => Math.max(256 * 1024 * 1024, Math.floor(host.memoryBytes / 20));
