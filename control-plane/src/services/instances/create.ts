import {
  ApiError,
  BANDWIDTH_LIMIT_BPS,
  type CreateInstanceRequest,
  formatRate,
  type Instance,
  InvalidRequestError,
  NotSupportedError,
  normalizeImageRef,
  parseRate,
  parseSize,
} from "@offshoot/shared";
import { statement, transaction } from "../../db/client.ts";
import { instances } from "../../db/schema/index.ts";
import { type Call, hostGrace, newCall, type Services } from "../context.ts";
import { insertCreatedEvent } from "../events.ts";
import { holdsDigest, imageForInstance, lacksImage, requireBootable, tooSmall } from "../images.ts";
import { allocateIp, newMac } from "../network.ts";
import { overcommitOf, placeInstance } from "../placement.ts";
import { resolveMounts } from "../volumes.ts";
import { nameConflict, nameInUse, nameTaken } from "./errors.ts";
import { newInstanceId } from "./ids.ts";
import { present } from "./present.ts";
import { rowAfter } from "./resolve.ts";
import { specOf } from "./spec.ts";

const MIN_MEMORY = 64 * 1024 * 1024;
const MIN_OVERLAY = 1024 * 1024;

// Fields of Hypeman's request that this control plane does not implement yet. A request that
// sets one gets a 501 naming it rather than an instance silently missing the feature.
const UNSUPPORTED = [
  "devices",
  "gpu",
  "credentials",
  "snapshot_policy",
  "auto_standby",
  "health_check",
  "restart_policy",
  "ttl",
  "expires_at",
] as const;

export function checkCreate(req: CreateInstanceRequest) {
  for (const field of UNSUPPORTED) {
    const v = req[field];
    if (v !== undefined && v !== null && !(Array.isArray(v) && v.length === 0)) {
      throw new NotSupportedError(`${field} is not supported by this control plane yet`);
    }
  }
  if (req.network?.egress !== undefined && req.network.egress !== null) {
    throw new NotSupportedError("network.egress is not supported by this control plane yet");
  }
  if (normalizeImageRef(req.image) === undefined) {
    throw new InvalidRequestError(`image: "${req.image}" is not an OCI image reference`);
  }
  if (req.platform !== undefined && req.platform !== "linux/amd64") {
    throw new ApiError(
      "invalid_platform",
      `platform ${req.platform} is not available; hosts run linux/amd64`,
    );
  }
  const memoryBytes = parseSize(req.size ?? "1GB");
  const overlayBytes = parseSize(req.overlay_size ?? "10GB");
  if (memoryBytes < MIN_MEMORY) throw new InvalidRequestError("size must be at least 64MB");
  if (overlayBytes < MIN_OVERLAY)
    throw new InvalidRequestError("overlay_size must be at least 1MB");
  return {
    memoryBytes,
    overlayBytes,
    hotplugBytes: req.hotplug_size ? parseSize(req.hotplug_size) : 0,
    diskIoBps: req.disk_io_bps ? parseRate(req.disk_io_bps) : null,
    download: bandwidth("bandwidth_download", req.network?.bandwidth_download),
    upload: bandwidth("bandwidth_upload", req.network?.bandwidth_upload),
  };
}

/** A bandwidth limit in bytes/s (null: none), within what hosts can enforce. */
function bandwidth(field: string, value: string | undefined): number | null {
  if (!value) return null;
  const bps = parseRate(value);
  const { min, max } = BANDWIDTH_LIMIT_BPS;
  if (bps < min || bps > max) {
    throw new InvalidRequestError(
      `network.${field} must be between ${formatRate(min)} and ${formatRate(max)} (got ${value})`,
    );
  }
  return bps;
}

/** POST /instances: place, record, boot on the host; 201 once the host has created it. */
export async function createInstance(
  s: Services,
  tenantId: string,
  req: CreateInstanceRequest,
  call: Call = newCall(s),
): Promise<Instance> {
  const sizes = checkCreate(req);
  const vcpus = req.vcpus ?? 2;
  const networkEnabled = req.network?.enabled ?? true;
  const volumes = req.volumes ?? [];
  // Checked in Hypeman's order: the name first, then what the request needs of a host.
  if (await nameInUse(s.db, tenantId, req.name)) throw nameTaken(req.name);
  // The tenant's own image of that name (400 image_not_ready unless pulled), else hosts'.
  const pulled = await imageForInstance(s.db, tenantId, req.image);
  await requireBootable(s.db, hostGrace(s), req.image, sizes.memoryBytes, !!pulled);
  const op = await transaction(s.db, async (tx) => {
    // Volumes first: they decide the host (and lock their rows against a second writer).
    const attached = await resolveMounts(tx, tenantId, volumes);
    const { host, hypervisor } = await placeInstance(
      tx,
      hostGrace(s),
      overcommitOf(s.env),
      { vcpus, memoryBytes: sizes.memoryBytes + sizes.hotplugBytes },
      req.hypervisor,
      (h) => {
        const caps = h.capabilities;
        if (sizes.hotplugBytes > 0 && !caps?.hotplug_memory)
          return `host ${h.name} cannot hotplug memory`;
        if (sizes.diskIoBps !== null && !caps?.disk_io_limit)
          return `host ${h.name} cannot limit disk I/O`;
        if (volumes.length > 0 && !caps?.volumes) return `host ${h.name} cannot attach volumes`;
        if (attached.hostId !== null && h.id !== attached.hostId) {
          return `the instance's volumes live on another host than ${h.name}`;
        }
        return tooSmall(h, sizes.memoryBytes) ?? (pulled ? undefined : lacksImage(h, req.image));
      },
      // A host that already holds the pulled image boots it without fetching it.
      pulled?.digest ? (h) => holdsDigest(h, pulled.digest as string) : undefined,
    );
    const [row] = await tx
      .insert(instances)
      .values({
        id: newInstanceId(),
        tenantId,
        hostId: host.id,
        name: req.name,
        image: req.image,
        imageId: pulled?.id ?? null,
        imageDigest: pulled?.digest ?? null,
        hypervisor,
        state: "Created",
        vcpus,
        memoryBytes: sizes.memoryBytes,
        hotplugBytes: sizes.hotplugBytes,
        overlayBytes: sizes.overlayBytes,
        diskIoBps: sizes.diskIoBps,
        env: req.env ?? {},
        tags: req.tags ?? {},
        entrypoint: req.entrypoint ?? null,
        cmd: req.cmd ?? null,
        networkEnabled,
        skipGuestAgent: req.skip_guest_agent ?? false,
        ip: networkEnabled ? await allocateIp(tx, host.id) : null,
        mac: networkEnabled ? newMac() : null,
        bandwidthDownloadBps: sizes.download,
        bandwidthUploadBps: sizes.upload,
        volumes: attached.mounts,
      })
      .returning();
    if (!row) throw new Error("instance insert returned nothing");
    await statement(tx, insertCreatedEvent(row));
    return s.ops.insert(tx, {
      tenantId,
      hostId: host.id,
      instanceId: row.id,
      lock: "exclusive",
      payload: { kind: "create", instance: specOf(row, host.subnet) },
    });
  }).catch((e: unknown) => nameConflict(e, req.name));
  await s.ops.run(op, call);
  return present(await rowAfter(s, tenantId, op.id, op.instanceId ?? ""));
}
