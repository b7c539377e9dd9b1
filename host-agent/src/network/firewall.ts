// The host's one nft table. Loaded with `nft -f -` as one transaction that declares the table,
// deletes it and defines it anew: re-running replaces every rule atomically, never duplicates
// one, and never leaves a moment without the table. Family ip: guest subnets are IPv4.
//
//  postrouting (nat): traffic from the guest subnet leaving by any device but the bridge is
//    masqueraded to that device's address, so guests reach whatever the namespace routes to
//    without anything upstream knowing their subnet.
//  forward (filter, policy accept: other forwarded traffic of the namespace is not ours):
//    - bridge → bridge drops: guest-to-guest. With br_netfilter (bridge-nf-call-iptables=1)
//      bridged IPv4 traffic passes this hook with the bridge as both devices. The TAPs' bridge
//      port flag `isolated on` is what stops it at layer 2, for every protocol; this rule is
//      the second lock should a port ever lose the flag.
//    - from the bridge with a source outside the subnet drops: a guest cannot spoof others.
//    - towards the bridge only established/related passes: nothing outside the namespace opens
//      a connection to a guest. (The namespace's own side reaches guests directly on the
//      bridge: that is input/output, not forwarding.)
// The drop rules count, for operators and tests.
import { inNetns, inNetnsOk, type NetContext } from "./context.ts";
import type { Subnet } from "./subnet.ts";

export function ruleset(table: string, bridge: string, subnet: Subnet): string {
  const br = JSON.stringify(bridge);
  // Closing braces on their own lines: nft 1.0.6 rejects some on a rule's line.
  return [
    `table ip ${table}`,
    `delete table ip ${table}`,
    `table ip ${table} {`,
    "  chain postrouting {",
    "    type nat hook postrouting priority srcnat; policy accept;",
    `    ip saddr ${subnet.cidr} oifname != ${br} masquerade`,
    "  }",
    "  chain forward {",
    "    type filter hook forward priority filter; policy accept;",
    `    iifname ${br} oifname ${br} counter drop comment "guest to guest"`,
    `    iifname ${br} ip saddr != ${subnet.cidr} counter drop comment "spoofed source"`,
    `    oifname ${br} ct state established,related accept`,
    `    oifname ${br} counter drop comment "new inbound"`,
    "  }",
    "}",
    "",
  ].join("\n");
}

export async function loadRuleset(ctx: NetContext, subnet: Subnet): Promise<void> {
  await inNetnsOk(ctx, "nft", ["-f", "-"], { input: ruleset(ctx.table, ctx.bridge, subnet) });
}

/** `nft list table` of the host's table, or null when it is absent. */
export async function listRuleset(ctx: NetContext): Promise<string | null> {
  const r = await inNetns(ctx, "nft", ["list", "table", "ip", ctx.table], {
    tolerate: /No such file or directory/,
  });
  return r?.stdout ?? null;
}
