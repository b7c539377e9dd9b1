// Guest addresses, allocated here in Postgres so that no two guests share one.
//
// Each host owns one subnet of GUEST_POOL, a /GUEST_SUBNET_PREFIX block given when the host is
// registered: the lowest free block, under an advisory lock, with an exclusion constraint
// (hosts_subnet_no_overlap, migration 0003) refusing any overlap whatever the block size. Inside
// a host's subnet, the first address is the host's bridge (the guests' gateway) and each guest
// takes the lowest free address after it; the unique (host_id, ip) index refuses a second
// holder. Addresses are freed with their instance's row and kept for its whole life: stop,
// start, standby and restore never change them. A fork gets its own.
import { randomBytes } from "node:crypto";
import { InsufficientResourcesError } from "@offshoot/shared";
import { type SQL, sql } from "drizzle-orm";
import { statement, type Tx } from "../db/client.ts";

/** The block every host's guest subnet is cut from: 10.64.0.0–10.127.255.255. */
export const GUEST_POOL = "10.64.0.0/10";
/** Each host's subnet: a /20, 4,093 guests (its first address is the host's bridge). */
export const GUEST_SUBNET_PREFIX = 20;

const POOL_BASE = GUEST_POOL.split("/")[0] ?? "";
const POOL_PREFIX = Number(GUEST_POOL.split("/")[1]);
const BLOCK = 2 ** (32 - GUEST_SUBNET_PREFIX);
const BLOCKS = 2 ** (GUEST_SUBNET_PREFIX - POOL_PREFIX);
/** Serialises subnet choices (pg_advisory_xact_lock key). */
const SUBNET_LOCK = 0x0ff5_0001;

/**
 * The lowest block of GUEST_POOL no host holds, as a CIDR ("10.64.16.0/20"). Takes a
 * transaction-scoped advisory lock so that two registrations cannot choose the same block; the
 * exclusion constraint would refuse the second anyway.
 */
export async function allocateHostSubnet(tx: Tx): Promise<string> {
  await statement(tx, sql`select pg_advisory_xact_lock(${SUBNET_LOCK})`);
  const [row] = await statement(
    tx,
    sql`with used as materialized (
          select (network(subnet) - ${POOL_BASE}::inet) / ${BLOCK} as k from hosts
          union all select -1
        )
        select text(set_masklen(${POOL_BASE}::inet + k * ${BLOCK}, ${GUEST_SUBNET_PREFIX})::cidr) as subnet
          from (select min(u.k + 1) as k from used u
                where not exists (select 1 from used v where v.k = u.k + 1)) free
          where k < ${BLOCKS}`,
  );
  if (!row?.subnet) {
    throw new InsufficientResourcesError(
      `every /${GUEST_SUBNET_PREFIX} of the guest address pool ${GUEST_POOL} is taken by a host`,
    );
  }
  return String(row.subnet);
}

/** A random locally administered unicast MAC (02:…); the unique index on instances.mac refuses
 * the rare clash of 40 random bits, and the create or fork is then retried by its caller. */
export function newMac(): string {
  const b = randomBytes(5);
  return `02:${[...b].map((x) => x.toString(16).padStart(2, "0")).join(":")}`;
}

/** A guest address on the host, or the insufficient_resources error when its subnet is full.
 * Callers hold the host row's lock (lockOnlineHost/placeInstance), so two picks cannot collide. */
export async function allocateIp(tx: Tx, hostId: string): Promise<string> {
  const ip = await freeAddress(tx, hostId);
  if (!ip) throw noAddress(hostId);
  return ip;
}

/** A host whose guest subnet is full. */
export const noAddress = (host: string) =>
  new InsufficientResourcesError(`host ${host} has no free guest address left in its subnet`);

/**
 * allocateIp() without the throw: the lowest free address of the host's subnet, one past the
 * lowest offset in use (the bridge's, 1, always is) whose successor is free; null when the subnet
 * is full. The offsets in use are read once and anti-joined with themselves by hash, so the cost
 * grows linearly with the host's instances (an index probe per address cost 4 ms at 400
 * instances). `hostId` may be a subquery (see exactly() in resolve.ts).
 */
export async function freeAddress(tx: Tx, hostId: string | SQL): Promise<string | null> {
  const [row] = await statement(
    tx,
    sql`with h as (select subnet from hosts where id = ${hostId}),
        used as materialized (
          select i.ip::inet - network(h.subnet) as n from instances i, h
            where i.host_id = ${hostId} and i.ip is not null
          union all select 1
        ),
        pick as (
          select min(u.n + 1) as n from used u where not exists (select 1 from used v where v.n = u.n + 1)
        )
        select host(network(h.subnet) + pick.n) as ip from h, pick
          where pick.n < 2 ^ (32 - masklen(h.subnet)) - 1`,
  );
  return (row?.ip as string | undefined) ?? null;
}
