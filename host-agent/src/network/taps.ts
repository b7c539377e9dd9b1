// One persistent TAP per instance, named after its id, attached to the bridge as an isolated
// port. Persistent: it outlives the QEMU that opens it and the agent that made it, so a
// restarted agent adopts it (and its limits) rather than making another.
//
// Names: "ot" + the id's first 13 characters (IFNAMSIZ allows 15); its upload IFB is "oi" + the
// same. Instance ids are CUID2s, random from their second character on, so two of a host's
// instances sharing 13 leading characters is not a practical concern. An IFB exists only while
// its TAP does (made after it, removed before it), so a crash leaves no IFB without its TAP.
import { allLinks, deleteLink, inNetnsOk, link, type NetContext } from "./context.ts";
import { applyDownload, applyUpload, checkRate, type RateLimits } from "./rates.ts";

export const TAP_PREFIX = "ot";
export const IFB_PREFIX = "oi";
export const ID_CHARS = 13;
const INSTANCE_ID = /^[A-Za-z0-9_-]+$/;

export function tapName(instanceId: string): string {
  if (!INSTANCE_ID.test(instanceId)) {
    throw new RangeError(
      `instance id ${JSON.stringify(instanceId)} cannot name a TAP: [A-Za-z0-9_-]+ expected`,
    );
  }
  return TAP_PREFIX + instanceId.slice(0, ID_CHARS);
}

export function isTapName(name: string): boolean {
  return (
    name.startsWith(TAP_PREFIX) &&
    name.length > TAP_PREFIX.length &&
    name.length <= TAP_PREFIX.length + ID_CHARS &&
    INSTANCE_ID.test(name.slice(TAP_PREFIX.length))
  );
}

/** The upload IFB that goes with a TAP. */
export function ifbOf(tap: string): string {
  if (!isTapName(tap)) throw new RangeError(`${JSON.stringify(tap)} is not an instance TAP name`);
  return IFB_PREFIX + tap.slice(TAP_PREFIX.length);
}

export async function ensureTap(
  ctx: NetContext,
  instanceId: string,
  limits: RateLimits,
): Promise<string> {
  checkRate("download", limits.downloadBps);
  checkRate("upload", limits.uploadBps);
  const tap = tapName(instanceId);
  // Each looked up by name: a listing of every link grows with the host's guests.
  const bridge = await link(ctx, ctx.bridge);
  if (bridge?.linkinfo?.info_kind !== "bridge") {
    throw new Error(`no bridge ${ctx.bridge} to attach ${tap} to: ensureSubnet comes first`);
  }
  // Setting the same master again and `isolated` together is refused; separately both are
  // idempotent.
  const attach = [
    `link set dev ${tap} master ${ctx.bridge} up`,
    `link set dev ${tap} type bridge_slave isolated on`,
  ];
  const existing = await link(ctx, tap);
  if (!existing) {
    // A new TAP (a fork's, on its way to its first restore): made and attached by one `ip`
    // process, and given limits only if it has any (a new TAP has none to remove). vnet_hdr:
    // QEMU's virtio-net passes offloads (GSO, checksums) through it.
    await inNetnsOk(ctx, "ip", ["-batch", "-"], {
      input: [`tuntap add dev ${tap} mode tap vnet_hdr`, ...attach, ""].join("\n"),
    });
    if (limits.downloadBps !== null) await applyDownload(ctx, tap, limits.downloadBps);
    if (limits.uploadBps !== null) await applyUpload(ctx, tap, ifbOf(tap), limits.uploadBps);
    return tap;
  }
  const kind = existing.linkinfo;
  if (kind?.info_kind !== "tun" || kind.info_data?.type !== "tap") {
    throw new Error(`${tap} exists and is not a TAP (${kind?.info_kind ?? "no kind"})`);
  }
  await inNetnsOk(ctx, "ip", ["-batch", "-"], { input: [...attach, ""].join("\n") });
  await applyDownload(ctx, tap, limits.downloadBps);
  await applyUpload(ctx, tap, ifbOf(tap), limits.uploadBps);
  return tap;
}

/** Removes a TAP and its IFB; absent is fine. QEMU still holding the TAP loses its link. */
export async function removeTapNamed(ctx: NetContext, tap: string): Promise<void> {
  await deleteLink(ctx, ifbOf(tap));
  await deleteLink(ctx, tap);
}

/** Instance TAPs present, by name, sorted; an IFB whose TAP is gone counts as its TAP. */
export async function listTaps(ctx: NetContext): Promise<string[]> {
  const names = new Set<string>();
  for (const l of await allLinks(ctx)) {
    const kind = l.linkinfo?.info_kind;
    if (kind === "tun" && isTapName(l.ifname)) names.add(l.ifname);
    if (kind === "ifb" && l.ifname.startsWith(IFB_PREFIX)) {
      const tap = TAP_PREFIX + l.ifname.slice(IFB_PREFIX.length);
      if (isTapName(tap)) names.add(tap);
    }
  }
  return [...names].sort();
}
