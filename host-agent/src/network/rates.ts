// Per-TAP bandwidth limits with tc, in bytes per second (the instance spec's unit; tc's own
// "bps" would also mean bytes, so every rate is passed as `<bits>bit`).
//
//  download (towards the guest): the TAP's egress — a TBF as its root qdisc.
//  upload (from the guest): the TAP's ingress cannot queue, and this kernel has no `police`
//    action, so ingress traffic is redirected (u32 match-all + mirred) to the instance's own
//    IFB device, whose egress has the TBF.
// TBF drops a packet larger than its burst: with GSO a TAP sees packets up to 64 KiB, so the
// burst is never below that (MIN_BURST_BYTES); above it, 20 ms worth of the rate.
import { BANDWIDTH_LIMIT_BPS } from "@offshoot/shared";
import { deleteLink, inNetns, inNetnsOk, link, type NetContext } from "./context.ts";

export interface RateLimits {
  /** Bytes per second towards the guest; null = unlimited. */
  downloadBps: number | null;
  /** Bytes per second from the guest; null = unlimited. */
  uploadBps: number | null;
}

/** The range the API accepts (shared), well inside what tc's 64-bit rates take. */
export const MIN_RATE_BPS = BANDWIDTH_LIMIT_BPS.min;
export const MAX_RATE_BPS = BANDWIDTH_LIMIT_BPS.max;
/** 64 KiB GSO packets plus their headers, and room for tc's rounding of a burst into clock
 * ticks (measured: a 65536-byte burst comes back as 65535). */
export const MIN_BURST_BYTES = 68 * 1024;
export const MAX_BURST_BYTES = 64 * 1024 * 1024;
/** Queue a TBF keeps beyond its burst, as time at the rate. */
export const TBF_LATENCY = "50ms";
/** The TAP's ingress qdisc handle (the only one tc allows there). */
const INGRESS = "ffff:";

export function checkRate(what: string, bps: number | null): void {
  if (bps === null) return;
  if (!Number.isSafeInteger(bps) || bps < MIN_RATE_BPS || bps > MAX_RATE_BPS) {
    throw new RangeError(
      `${what} limit ${bps} B/s is out of range: an integer from ${MIN_RATE_BPS} to ${MAX_RATE_BPS} B/s, or null for none`,
    );
  }
}

export function burstBytes(bps: number): number {
  return Math.min(MAX_BURST_BYTES, Math.max(MIN_BURST_BYTES, Math.ceil(bps / 50)));
}

/** The qdisc spec after `tc qdisc replace dev X root`. */
export function tbf(bps: number): string[] {
  return ["tbf", "rate", `${bps * 8}bit`, "burst", String(burstBytes(bps)), "latency", TBF_LATENCY];
}

export async function applyDownload(ctx: NetContext, tap: string, bps: number | null) {
  if (bps !== null) {
    await inNetnsOk(ctx, "tc", ["qdisc", "replace", "dev", tap, "root", ...tbf(bps)]);
    return;
  }
  // No root qdisc of ours: the kernel's default one, which cannot be deleted.
  await inNetns(ctx, "tc", ["qdisc", "del", "dev", tap, "root"], {
    tolerate: /handle of zero|Cannot find specified qdisc|No such file or directory/,
  });
}

export async function applyUpload(ctx: NetContext, tap: string, ifb: string, bps: number | null) {
  if (bps === null) {
    await inNetns(ctx, "tc", ["qdisc", "del", "dev", tap, "handle", INGRESS, "ingress"], {
      tolerate: /Cannot find specified qdisc|Invalid handle|No such file or directory/,
    });
    await deleteLink(ctx, ifb);
    return;
  }
  // The IFB and its TBF first: redirecting to a missing or down IFB would drop the traffic.
  const existing = await link(ctx, ifb);
  if (existing && existing.linkinfo?.info_kind !== "ifb") {
    throw new Error(`${ifb} exists and is not an ifb device (${existing.linkinfo?.info_kind})`);
  }
  if (!existing) {
    await inNetns(ctx, "ip", ["link", "add", "name", ifb, "type", "ifb"], {
      tolerate: /File exists/,
    });
  }
  await inNetnsOk(ctx, "ip", ["link", "set", "dev", ifb, "up"]);
  await inNetnsOk(ctx, "tc", ["qdisc", "replace", "dev", ifb, "root", ...tbf(bps)]);
  // Replacing an ingress qdisc by another keeps its filters.
  await inNetnsOk(ctx, "tc", ["qdisc", "replace", "dev", tap, "handle", INGRESS, "ingress"]);
  if (!(await redirectsTo(ctx, tap, ifb))) {
    await inNetnsOk(ctx, "tc", [
      "filter",
      "add",
      "dev",
      tap,
      "parent",
      INGRESS,
      "protocol",
      "all",
      "u32",
      "match",
      "u32",
      "0",
      "0",
      "action",
      "mirred",
      "egress",
      "redirect",
      "dev",
      ifb,
    ]);
  }
}

interface TcFilter {
  options?: { actions?: Array<{ kind?: string; to_dev?: string }> };
}

async function redirectsTo(ctx: NetContext, tap: string, ifb: string): Promise<boolean> {
  const filters = JSON.parse(
    await inNetnsOk(ctx, "tc", ["-j", "filter", "show", "dev", tap, "parent", INGRESS]),
  ) as TcFilter[];
  return filters.some((f) =>
    f.options?.actions?.some((a) => a.kind === "mirred" && a.to_dev === ifb),
  );
}

interface TcQdisc {
  kind: string;
  root?: boolean;
  options?: { rate?: number };
}

/** The root TBF's rate of a device in B/s (tc's JSON gives bytes), or null. */
async function rootTbfRate(ctx: NetContext, dev: string): Promise<number | null> {
  const r = await inNetns(ctx, "tc", ["-j", "qdisc", "show", "dev", dev], {
    tolerate: /Cannot find device|does not exist/,
  });
  if (r === null) return null;
  const root = (JSON.parse(r.stdout) as TcQdisc[]).find((q) => q.root);
  return root?.kind === "tbf" ? (root.options?.rate ?? null) : null;
}

/** The limits a TAP has now, read back from the kernel. */
export async function readLimits(ctx: NetContext, tap: string, ifb: string): Promise<RateLimits> {
  const downloadBps = await rootTbfRate(ctx, tap);
  const redirected = (await link(ctx, tap)) !== null && (await redirectsTo(ctx, tap, ifb));
  return { downloadBps, uploadBps: redirected ? await rootTbfRate(ctx, ifb) : null };
}
