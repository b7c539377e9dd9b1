import { randomBytes } from "node:crypto";
import { type Hypervisor, type InstanceSpec, InsufficientResourcesError } from "@offshoot/shared";
import { type SQL, sql } from "drizzle-orm";
import { statement, type Tx } from "../../db/client.ts";
import type { InstanceRow } from "../../db/schema/index.ts";

/** What the host needs to run an instance, from its row. */
export function specOf(r: InstanceRow): InstanceSpec {
  return {
    id: r.id,
    name: r.name,
    image: r.image,
    hypervisor: r.hypervisor as Hypervisor,
    vcpus: r.vcpus,
    memory_bytes: r.memoryBytes,
    hotplug_bytes: r.hotplugBytes,
    overlay_bytes: r.overlayBytes,
    disk_io_bps: r.diskIoBps,
    env: r.env,
    entrypoint: r.entrypoint,
    cmd: r.cmd,
    network: {
      enabled: r.networkEnabled,
      mac: r.mac,
      ip: r.ip,
      bandwidth_download_bps: r.bandwidthDownloadBps,
      bandwidth_upload_bps: r.bandwidthUploadBps,
    },
    volumes: r.volumes,
  };
}

/** A random locally-administered unicast MAC (02:…); 40 random bits make clashes negligible. */
export function newMac(): string {
  const b = randomBytes(5);
  return `02:${[...b].map((x) => x.toString(16).padStart(2, "0")).join(":")}`;
}

// Each host's guests live on 10.100.0.0/16; .0.1 is the host's bridge.
const SUBNET = "10.100.0.0";
const SUBNET_NUM = (10 << 24) | (100 << 16);
const LAST_HOST = 65534;

/**
 * The lowest free address on the host: one past the lowest address in use (or .0.1) whose
 * successor is free. The offsets in use are read once and anti-joined with themselves by hash,
 * so the cost grows linearly with the host's instances (an index probe per address cost 4 ms
 * at 400 instances). Callers hold the host row lock (see lockOnlineHost/placeInstance), so two picks
 * cannot collide; the unique (host_id, ip) index would refuse a second one anyway.
 */
export async function allocateIp(tx: Tx, hostId: string): Promise<string> {
  const ip = await freeAddress(tx, hostId);
  if (!ip) throw noAddress(hostId);
  return ip;
}

/** A host whose guest network is full. */
export const noAddress = (host: string) =>
  new InsufficientResourcesError(`host ${host} has no free guest address left in ${SUBNET}/16`);

/** allocateIp() without the throw: null when the host has no address left. `hostId` may be a
 * subquery (see exactly() in resolve.ts). */
export async function freeAddress(tx: Tx, hostId: string | SQL): Promise<string | null> {
  const [row] = await statement(
    tx,
    sql`with used as materialized (
          select ip::inet - ${SUBNET}::inet as n from instances where host_id = ${hostId} and ip is not null
          union all select 1
        )
        select min(u.n + 1)::int as n from used u where not exists (select 1 from used v where v.n = u.n + 1)`,
  );
  const n = Number(row?.n ?? Number.NaN);
  if (!(n >= 2 && n <= LAST_HOST)) return null;
  return [24, 16, 8, 0].map((shift) => ((SUBNET_NUM + n) >>> shift) & 255).join(".");
}
