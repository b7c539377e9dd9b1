// Guest networking on one host: a Linux bridge holding the gateway address of the host's guest
// subnet, NAT (masquerade) for the guests' egress, one isolated TAP per instance on the bridge,
// and per-TAP bandwidth limits with tc in both directions.
//
// Everything may live in a named network namespace (AGENT_NETNS): tests, benchmarks and
// `npm start` use one of their own so they never touch the machine's network; production
// leaves it empty and builds in the agent's own (the host's) namespace.
//
// Why it is shaped so:
// - Isolation between guests is a bridge port flag (`isolated on`: isolated ports forward only to
//   non-isolated ones, i.e. the bridge itself) plus a forward-chain drop (firewall.ts). Each
//   guest reaches its gateway (the namespace's side) and, masqueraded, whatever the namespace
//   routes to; nothing outside the namespace opens a connection to a guest (only
//   established/related traffic is forwarded to the bridge), while the namespace's own side
//   reaches guests directly on the bridge.
// - Every step is idempotent and adopts what exists (the bridge, its address, the TAPs, their
//   qdiscs, the nft table replaced atomically), so an agent that crashed halfway, or restarted,
//   just runs it again. The module keeps no state beyond what the kernel shows.
// - Every command runs through run.ts: bounded time and output, errors that carry the command
//   and its stderr. Commands run in the namespace with nsenter, which sets up no mount
//   namespace (unlike `ip netns exec`); QEMU starts under the same prefix (execPrefix).
// - Calls on one TAP (and on the subnet) run one at a time within the process: two concurrent
//   ensureTaps of an instance would otherwise both find no TAP and both make one.
// - In the host's own namespace, a firewall whose forward policy drops (Docker's, for one) must
//   let the bridge's traffic through; this module adds its own table and touches no other.

import { ensureBridge } from "./bridge.ts";
import type { NetContext } from "./context.ts";
import { listRuleset } from "./firewall.ts";
import { ensureNetns, netnsPrefix } from "./netns.ts";
import { type RateLimits, readLimits } from "./rates.ts";
import { parseSubnet } from "./subnet.ts";
import { ensureTap, ifbOf, listTaps, removeTapNamed, tapName } from "./taps.ts";
import { findTools, toolDirs } from "./tools.ts";

export { MAX_RATE_BPS, MIN_RATE_BPS, type RateLimits } from "./rates.ts";
export { CommandError } from "./run.ts";
export { parseSubnet, type Subnet } from "./subnet.ts";
export { isTapName } from "./taps.ts";

export const DEFAULT_BRIDGE = "offshoot0";
export const DEFAULT_TABLE = "offshoot";

export interface HostNetworkOptions {
  /** Network namespace for everything the agent creates; null = the agent's own namespace. */
  netns: string | null;
  /** Create the namespace if missing (tests, npm start). Default false: a missing named netns is
   * a clear error. */
  createNetns?: boolean;
  /** The bridge's name (default offshoot0, ≤ 15 chars). */
  bridge?: string;
  /** The nft table's name (family ip; default offshoot). */
  table?: string;
  /** Where ip, tc, nft, sysctl and nsenter are looked for (default PATH, then the sbin dirs). */
  toolDirs?: readonly string[];
}

/** Not a TAP name (those start with "ot"): the queue key of the bridge and table. */
const SUBNET_KEY = "subnet";
const IFNAME = /^[A-Za-z0-9_-]{1,15}$/;
const NFT_NAME = /^[A-Za-z][A-Za-z0-9_]{0,63}$/;

export class HostNetwork {
  readonly netns: string | null;
  /** Prefix that runs a command in the namespace, e.g. ["/usr/bin/nsenter",
   * "--net=/run/netns/NS", "--"]; [] for none. Used to start QEMU. */
  readonly execPrefix: readonly string[];
  readonly bridge: string;
  private readonly ctx: NetContext;
  /** The last queued call per key (a TAP's name, or SUBNET_KEY). */
  private readonly queues = new Map<string, Promise<unknown>>();

  private constructor(netns: string | null, ctx: NetContext) {
    this.netns = netns;
    this.ctx = ctx;
    this.execPrefix = ctx.prefix;
    this.bridge = ctx.bridge;
  }

  /** Finds the tools (an error names each missing one and its Debian package) and makes sure
   * the namespace exists (creating it only if asked). */
  static async open(opts: HostNetworkOptions): Promise<HostNetwork> {
    const bridge = opts.bridge ?? DEFAULT_BRIDGE;
    const table = opts.table ?? DEFAULT_TABLE;
    if (!IFNAME.test(bridge)) throw new RangeError(`invalid bridge name ${JSON.stringify(bridge)}`);
    if (!NFT_NAME.test(table))
      throw new RangeError(`invalid nft table name ${JSON.stringify(table)}`);
    const tools = findTools(opts.toolDirs ?? toolDirs());
    if (opts.netns !== null) await ensureNetns(tools, opts.netns, opts.createNetns ?? false);
    const prefix = Object.freeze(netnsPrefix(tools, opts.netns));
    return new HostNetwork(opts.netns, { tools, prefix, bridge, table });
  }

  /** Idempotent: the bridge up with the subnet's first host address as gateway (another subnet's
   * address is replaced), ip_forward on, and the host's nft table loaded anew. */
  async ensureSubnet(subnet: string): Promise<void> {
    const parsed = parseSubnet(subnet);
    await this.serial(SUBNET_KEY, () => ensureBridge(this.ctx, parsed));
  }

  /** The TAP name for an instance id: "ot" + its first 13 characters. */
  tapName(instanceId: string): string {
    return tapName(instanceId);
  }

  /** Idempotent: the instance's persistent TAP (vnet_hdr) on the bridge, isolated, up, with its
   * limits applied, replaced or removed (null = unlimited). An existing TAP is adopted. Limits
   * are bytes per second, MIN_RATE_BPS–MAX_RATE_BPS. Returns the TAP's name. */
  async ensureTap(
    instanceId: string,
    limits: { downloadBps: number | null; uploadBps: number | null },
  ): Promise<string> {
    return this.serial(tapName(instanceId), () => ensureTap(this.ctx, instanceId, limits));
  }

  /** Removes the instance's TAP and its IFB (absent is fine). */
  async removeTap(instanceId: string): Promise<void> {
    await this.removeTapNamed(tapName(instanceId));
  }

  /** Removes a TAP by the name listTaps gave (garbage collection of unknown instances'). */
  async removeTapNamed(tap: string): Promise<void> {
    await this.serial(tap, () => removeTapNamed(this.ctx, tap));
  }

  /** Instance-owned TAPs present (by name), for garbage collection after a crash. */
  async listTaps(): Promise<string[]> {
    return listTaps(this.ctx);
  }

  /** The limits the instance's TAP has now, as the kernel shows them. */
  async limits(instanceId: string): Promise<RateLimits> {
    const tap = tapName(instanceId);
    return readLimits(this.ctx, tap, ifbOf(tap));
  }

  /** The host's nft table as `nft list table` prints it, or null when absent. */
  async ruleset(): Promise<string | null> {
    return listRuleset(this.ctx);
  }

  /** Runs `fn` after every call queued before it under `key` has settled. */
  private serial<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.queues.get(key) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const settled = next.then(
      () => {},
      () => {},
    );
    this.queues.set(key, settled);
    void settled.then(() => {
      if (this.queues.get(key) === settled) this.queues.delete(key);
    });
    return next;
  }
}
