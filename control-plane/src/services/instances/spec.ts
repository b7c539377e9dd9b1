import { type Hypervisor, type InstanceSpec, parseSize } from "@offshoot/shared";
import type { InstanceRow } from "../../db/schema/index.ts";

/** What the host needs to run an instance, from its row and its host's guest subnet. */
export function specOf(r: InstanceRow, subnet: string): InstanceSpec {
  return {
    id: r.id,
    name: r.name,
    image: r.image,
    image_digest: r.imageDigest,
    hypervisor: r.hypervisor as Hypervisor,
    vcpus: r.vcpus,
    memory_bytes: r.memoryBytes,
    hotplug_bytes: r.hotplugBytes,
    // An overlay volume's writes go to the instance's own disk: it has room for them too.
    overlay_bytes:
      r.overlayBytes +
      r.volumes.reduce(
        (n, v) => n + (v.overlay && v.overlay_size ? parseSize(v.overlay_size) : 0),
        0,
      ),
    disk_io_bps: r.diskIoBps,
    env: r.env,
    entrypoint: r.entrypoint,
    cmd: r.cmd,
    network: {
      enabled: r.networkEnabled,
      mac: r.mac,
      ip: r.ip,
      subnet: r.networkEnabled ? subnet : null,
      bandwidth_download_bps: r.bandwidthDownloadBps,
      bandwidth_upload_bps: r.bandwidthUploadBps,
    },
    volumes: r.volumes,
    skip_guest_agent: r.skipGuestAgent,
  };
}
