// What an instance spec makes of a guest: its machine (memory, vCPUs, MAC), its hostname, and
// the config disk /init sources at boot. Pure rules, checked before anything is made on disk.
import { createHash } from "node:crypto";
import { type InstanceSpec, InvalidRequestError } from "@offshoot/shared";
import { GUEST_CONFIG } from "../../../guest/protocol.ts";
import type { StoredImage } from "../../images/store.ts";
import { parseSubnet } from "../../network/subnet.ts";
import type { GuestIdentity } from "./control.ts";
import type { Machine, QemuRecord } from "./store.ts";

const MiB = 1024 * 1024;

/** The cloud kernel and /init need about 80 MiB to boot (64 MiB panics before /init; measured
 * under TCG); the smallest guest offered leaves room for the program. */
export const MIN_GUEST_MEMORY = 128 * 1024 * 1024;

export function machineFor(spec: InstanceSpec): Machine {
  return {
    memory_mib: Math.ceil(spec.memory_bytes / MiB),
    vcpus: spec.vcpus,
    mac: spec.network.enabled ? macFor(spec) : null,
    agent_port: true,
  };
}

/** The spec's MAC, or a stable locally administered one derived from the id. */
export function macFor(spec: InstanceSpec): string {
  if (spec.network.mac) {
    if (!/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i.test(spec.network.mac)) {
      throw new InvalidRequestError(`invalid MAC address "${spec.network.mac}"`);
    }
    return spec.network.mac.toLowerCase();
  }
  const h = createHash("sha256").update(spec.id).digest();
  return ["02", ...[...h.subarray(0, 5)].map((b) => b.toString(16).padStart(2, "0"))].join(":");
}

/** eth0's address ("10.64.16.5/20") and the default gateway (the subnet's first address, the
 * host's bridge); nulls for a guest without a NIC, or a record from before guest subnets. */
export function guestAddress(spec: Pick<InstanceSpec, "network">): {
  address: string | null;
  gateway: string | null;
} {
  const { ip, subnet } = spec.network;
  if (!spec.network.enabled || !ip || !subnet) return { address: null, gateway: null };
  const { prefixLength, gateway } = parseSubnet(subnet);
  return { address: `${ip}/${prefixLength}`, gateway };
}

/** The guest's machine id (/etc/machine-id where its image has one): 32 hex digits of its id. */
export function machineIdOf(id: string): string {
  return createHash("sha256").update(`machine-id:${id}`).digest("hex").slice(0, 32);
}

/** Who the guest is: hostname, NIC, address and machine id, as the control channel's identity
 * command sets them. */
export function identityFor(rec: QemuRecord): GuestIdentity {
  return {
    hostname: guestHostname(rec.spec.name),
    mac: rec.machine.mac,
    ...(rec.machine.mac === null ? { address: null, gateway: null } : guestAddress(rec.spec)),
    machineId: machineIdOf(rec.observed.id),
  };
}

/** The identity as one comparable string: what the record says the guest's memory holds. */
export function identityOf(rec: QemuRecord): string {
  const i = identityFor(rec);
  return [i.hostname, i.mac ?? "-", i.address ?? "-", i.gateway ?? "-", i.machineId].join(" ");
}

/** Whether the guest's memory already holds the record's identity: identityOf(), or, for a guest
 * an older agent booted or restored (which recorded only "hostname MAC"), that older form of the
 * same instance's identity — so a plain restore of it sends nothing its older /init would not
 * understand. */
export function holdsIdentity(rec: QemuRecord): boolean {
  const held = rec.guest_identity;
  return (
    held === identityOf(rec) || held === `${guestHostname(rec.spec.name)} ${rec.machine.mac ?? "-"}`
  );
}

const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
/** The config disk is read as a block device: whole sectors. */
const CONFIG_BLOCK = 4096;

/**
 * The config disk /init sources at boot: hostname, working dir, address, gateway, machine id,
 * environment and argv, every
 * value single-quoted. The program is chosen as `docker run` does: the spec's entrypoint replaces
 * the image's (and drops the image's cmd), the spec's cmd replaces the image's cmd; the spec's env
 * goes over the image's. Padded with newlines to whole blocks.
 */
export function guestConfig(
  spec: Pick<InstanceSpec, "id" | "name" | "entrypoint" | "cmd" | "env" | "network"> &
    Partial<Pick<InstanceSpec, "volumes" | "skip_guest_agent">>,
  image: Pick<StoredImage, "name" | "entrypoint" | "cmd" | "env" | "working_dir"> &
    Partial<Pick<StoredImage, "user">>,
): string {
  const ownEntrypoint = spec.entrypoint?.length ? spec.entrypoint : null;
  const entrypoint = ownEntrypoint ?? image.entrypoint ?? [];
  const cmd = spec.cmd?.length ? spec.cmd : ownEntrypoint ? [] : (image.cmd ?? []);
  const argv = [...entrypoint, ...cmd];
  if (argv.length === 0) {
    throw new InvalidRequestError(
      `image ${image.name} has no entrypoint or cmd: give the instance an entrypoint or cmd`,
    );
  }
  const env = { ...image.env, ...spec.env };
  const net = guestAddress(spec);
  const exports = Object.entries(env).map(([k, v]) => {
    if (!ENV_NAME.test(k)) throw new InvalidRequestError(`invalid environment variable "${k}"`);
    return `  export ${k}=${shellQuote(v)}`;
  });
  const text = [
    `${GUEST_CONFIG.hostname}=${shellQuote(guestHostname(spec.name))}`,
    `${GUEST_CONFIG.workdir}=${shellQuote(image.working_dir || "/")}`,
    `${GUEST_CONFIG.user}=${shellQuote(image.user ?? "")}`,
    `${GUEST_CONFIG.address}=${shellQuote(net.address ?? "")}`,
    `${GUEST_CONFIG.gateway}=${shellQuote(net.gateway ?? "")}`,
    `${GUEST_CONFIG.machineId}=${shellQuote(machineIdOf(spec.id))}`,
    `${GUEST_CONFIG.agent}=${spec.skip_guest_agent ? "''" : "'1'"}`,
    `${GUEST_CONFIG.env}() {`,
    "  :",
    ...exports,
    "}",
    `${GUEST_CONFIG.volumes}() {`,
    "  :",
    // Numbered as boot.ts attaches their disks.
    ...attachedVolumes(spec).map(
      (v, i) =>
        `  ${GUEST_CONFIG.volume} ${i} ${v.overlay ? "overlay" : v.readonly ? "ro" : "rw"} ${shellQuote(v.mount_path)}`,
    ),
    "}",
    `set -- ${argv.map(shellQuote).join(" ")}`,
    "",
  ].join("\n");
  const size = Math.ceil(Buffer.byteLength(text) / CONFIG_BLOCK) * CONFIG_BLOCK;
  return text + "\n".repeat(size - Buffer.byteLength(text));
}

/** The instance's name as a hostname: a DNS label. */
export function guestHostname(name: string): string {
  const label = name
    .toLowerCase()
    .replace(/[^a-z0-9-]+/g, "-")
    .slice(0, 63)
    .replace(/^-+|-+$/g, "");
  return label || "offshoot";
}

export function shellQuote(s: string): string {
  return `'${s.replaceAll("'", `'\\''`)}'`;
}

/** The volumes a guest attaches, in the order of their disks `offshoot-vol<n>`: those its spec
 * names with a host key (a spec from before volumes were real has none). */
export function attachedVolumes(
  spec: Partial<Pick<InstanceSpec, "volumes">>,
): Array<InstanceSpec["volumes"][number] & { key: string }> {
  return (spec.volumes ?? []).filter((v): v is typeof v & { key: string } => !!v.key);
}
