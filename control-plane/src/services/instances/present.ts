import { formatRate, formatSize, type Hypervisor, type Instance } from "@offshoot/shared";
import type { InstanceRow } from "../../db/schema/index.ts";
import type { StoredMount } from "../volumes.ts";

const iso = (d: Date | null) => (d ? d.toISOString().replace(/\.\d{3}Z$/, "Z") : null);

/** A database row as the API shows it: the contract's fields, sizes human-readable. */
export function present(r: InstanceRow): Instance {
  return {
    id: r.id,
    name: r.name,
    image: r.image,
    state: r.state,
    state_error: r.state === "Unknown" ? r.stateError : null,
    created_at: iso(r.createdAt) ?? "",
    expires_at: null,
    started_at: iso(r.startedAt),
    stopped_at: iso(r.stoppedAt),
    size: formatSize(r.memoryBytes),
    ...(r.hotplugBytes > 0 && { hotplug_size: formatSize(r.hotplugBytes) }),
    overlay_size: formatSize(r.overlayBytes),
    vcpus: r.vcpus,
    ...(r.diskIoBps != null && { disk_io_bps: formatRate(r.diskIoBps) }),
    env: r.env,
    tags: r.tags,
    forked_from: r.forkedFrom,
    host_id: r.hostId,
    network: {
      enabled: r.networkEnabled,
      ...(r.networkEnabled && { name: "default" }),
      ip: r.ip,
      mac: r.mac,
      ...(r.bandwidthDownloadBps != null && {
        bandwidth_download: formatRate(r.bandwidthDownloadBps),
      }),
      ...(r.bandwidthUploadBps != null && { bandwidth_upload: formatRate(r.bandwidthUploadBps) }),
    },
    // The host's key for each volume is not the API's.
    volumes: r.volumes.map(({ key: _, ...v }: StoredMount) => v),
    has_snapshot: r.hasSnapshot,
    hypervisor: r.hypervisor as Hypervisor,
    exit_code: r.exitCode,
    ...(r.exitMessage != null && { exit_message: r.exitMessage }),
  };
}
