// The host's bridge: holds the subnet's gateway address, carries every guest's TAP, and has a
// fixed MAC (a bridge without one takes its lowest port's, which changes as TAPs come and go
// and leaves guests with a stale ARP entry for their gateway).
import { inNetns, inNetnsOk, link, type NetContext } from "./context.ts";
import { loadRuleset } from "./firewall.ts";
import type { Subnet } from "./subnet.ts";

/** Locally administered, "of" in its second byte. */
export const BRIDGE_MAC = "02:6f:66:00:00:01";

interface AddrInfo {
  family: string;
  local: string;
  prefixlen: number;
}

export async function ensureBridge(ctx: NetContext, subnet: Subnet): Promise<void> {
  const existing = await link(ctx, ctx.bridge);
  if (existing && existing.linkinfo?.info_kind !== "bridge") {
    throw new Error(
      `${ctx.bridge} exists and is not a bridge (${existing.linkinfo?.info_kind ?? "no kind"}); ` +
        "remove it or give the host network another bridge name",
    );
  }
  if (!existing) {
    // Another agent run may race us to it: one that exists now is as good.
    await inNetns(
      ctx,
      "ip",
      ["link", "add", "name", ctx.bridge, "address", BRIDGE_MAC, "type", "bridge"],
      { tolerate: /File exists/ },
    );
  }
  // Re-address: the gateway of this subnet stays (or comes), every other IPv4 address goes.
  const want = `${subnet.gateway}/${subnet.prefixLength}`;
  const [shown] = JSON.parse(
    await inNetnsOk(ctx, "ip", ["-j", "-4", "addr", "show", "dev", ctx.bridge]),
  ) as Array<{ addr_info?: AddrInfo[] }>;
  for (const a of shown?.addr_info ?? []) {
    if (a.family !== "inet" || `${a.local}/${a.prefixlen}` === want) continue;
    await inNetns(ctx, "ip", ["addr", "del", `${a.local}/${a.prefixlen}`, "dev", ctx.bridge], {
      tolerate: /Cannot assign requested address/,
    });
  }
  await inNetnsOk(ctx, "ip", ["addr", "replace", want, "dev", ctx.bridge]);
  await inNetnsOk(ctx, "ip", ["link", "set", "dev", ctx.bridge, "up"]);
  // Off by default in a new namespace; NAT and forwarding need it.
  await inNetnsOk(ctx, "sysctl", ["-q", "-w", "net.ipv4.ip_forward=1"]);
  await loadRuleset(ctx, subnet);
}
