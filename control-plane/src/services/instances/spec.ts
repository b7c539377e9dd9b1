import { randomBytes } from "node:crypto";
import type { Hypervisor, InstanceSpec } from "@offshoot/shared";
import { and, eq, isNotNull } from "drizzle-orm";
import type { Tx } from "../../db/client.ts";
import { type InstanceRow, instances } from "../../db/schema/index.ts";

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
const SUBNET_BASE = (10 << 24) | (100 << 16);
const SUBNET_SIZE = 1 << 16;
const ipString = (n: number) => [24, 16, 8, 0].map((s) => (n >>> s) & 255).join(".");

/** The lowest free address on the host. Callers hold the host row lock (see admit/place). */
export async function allocateIp(tx: Tx, hostId: string): Promise<string> {
  const rows = await tx
    .select({ ip: instances.ip })
    .from(instances)
    .where(and(eq(instances.hostId, hostId), isNotNull(instances.ip)));
  const used = new Set(rows.map((r) => r.ip));
  for (let i = 2; i < SUBNET_SIZE - 1; i++) {
    const ip = ipString(SUBNET_BASE + i);
    if (!used.has(ip)) return ip;
  }
  throw new Error(`host ${hostId} has no free guest address`);
}
