// What the module's parts share: the tools, the namespace prefix every command runs under, the
// names of the host's objects, and the JSON views of links and qdiscs they inspect.
import { type RunOptions, run, runOk } from "./run.ts";
import type { NetworkTools } from "./tools.ts";

export interface NetContext {
  tools: NetworkTools;
  /** nsenter prefix for the namespace, [] for the agent's own. */
  prefix: readonly string[];
  /** The host's bridge (≤ 15 chars). */
  bridge: string;
  /** The host's nft table (family ip). */
  table: string;
}

type Tool = keyof NetworkTools;

/** Runs a tool inside the namespace; null when a failure matched opts.tolerate. */
export function inNetns(ctx: NetContext, tool: Tool, args: readonly string[], opts?: RunOptions) {
  return run([...ctx.prefix, ctx.tools[tool], ...args], opts);
}

/** inNetns for a command that must succeed; returns its stdout. */
export async function inNetnsOk(
  ctx: NetContext,
  tool: Tool,
  args: readonly string[],
  opts?: Omit<RunOptions, "tolerate">,
): Promise<string> {
  return (await runOk([...ctx.prefix, ctx.tools[tool], ...args], opts)).stdout;
}

/** The parts of `ip -j -d link show` this module reads. */
export interface LinkInfo {
  ifname: string;
  flags?: string[];
  master?: string;
  address?: string;
  linkinfo?: {
    info_kind?: string;
    info_data?: { type?: string };
    info_slave_kind?: string;
  };
}

/** One link by name, or null when there is none. */
export async function link(ctx: NetContext, name: string): Promise<LinkInfo | null> {
  const r = await inNetns(ctx, "ip", ["-j", "-d", "link", "show", "dev", name], {
    tolerate: /does not exist|Cannot find device/,
  });
  if (r === null) return null;
  const [info] = JSON.parse(r.stdout) as LinkInfo[];
  return info ?? null;
}

export async function allLinks(ctx: NetContext): Promise<LinkInfo[]> {
  return JSON.parse(await inNetnsOk(ctx, "ip", ["-j", "-d", "link", "show"])) as LinkInfo[];
}

/** Deletes a link; absent is fine. */
export async function deleteLink(ctx: NetContext, name: string): Promise<void> {
  await inNetns(ctx, "ip", ["link", "delete", "dev", name], {
    tolerate: /does not exist|Cannot find device/,
  });
}
