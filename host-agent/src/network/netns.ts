// The network namespace everything the module creates lives in: a named one (/run/netns/NAME,
// as `ip netns add` makes it) entered with nsenter, which — unlike `ip netns exec` — sets up no
// mount namespace; or none, for an agent whose own namespace is the host's.
import { existsSync } from "node:fs";
import path from "node:path";
import { run } from "./run.ts";
import type { NetworkTools } from "./tools.ts";

export const NETNS_DIR = "/run/netns";

/** `ip netns` accepts any file name; this module keeps to a portable, shell-safe subset. */
export const NETNS_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

export function checkNetnsName(name: string): string {
  if (!NETNS_NAME.test(name)) {
    throw new RangeError(
      `invalid network namespace name ${JSON.stringify(name)}: 1–64 of [A-Za-z0-9_.-], not starting with . _ -`,
    );
  }
  return name;
}

export function netnsPath(name: string): string {
  return path.join(NETNS_DIR, checkNetnsName(name));
}

/** The argv prefix that runs a command inside the namespace ([] for the agent's own). */
export function netnsPrefix(tools: Pick<NetworkTools, "nsenter">, netns: string | null): string[] {
  return netns === null ? [] : [tools.nsenter, `--net=${netnsPath(netns)}`, "--"];
}

/** Makes sure the named namespace exists: creates it if `create`, else a missing one is an
 * error (a typo in AGENT_NETNS must not silently build a host's network somewhere else). */
export async function ensureNetns(
  tools: Pick<NetworkTools, "ip">,
  netns: string,
  create: boolean,
): Promise<void> {
  const file = netnsPath(netns);
  if (existsSync(file)) return;
  if (!create) {
    throw new Error(
      `network namespace "${netns}" does not exist (${file} is missing): create it with ` +
        `\`ip netns add ${netns}\`, or leave AGENT_NETNS empty to use the agent's own namespace`,
    );
  }
  // Another process may create it meanwhile: that one is as good.
  await run([tools.ip, "netns", "add", netns], { tolerate: /File exists/ });
  // A new namespace's loopback is down; local services in it need it.
  await run([tools.ip, "-n", netns, "link", "set", "dev", "lo", "up"]);
}

/** Deletes a named namespace (absent is fine). Its devices go once no process holds it. */
export async function deleteNetns(tools: Pick<NetworkTools, "ip">, netns: string): Promise<void> {
  checkNetnsName(netns);
  await run([tools.ip, "netns", "delete", netns], { tolerate: /No such file or directory/ });
}
