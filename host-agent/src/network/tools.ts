// The programs the network module runs, found once at open so that a host that lacks one fails
// at start with the Debian package to install, not at its first instance.
import { accessSync, constants } from "node:fs";
import path from "node:path";

export interface NetworkTools {
  ip: string;
  tc: string;
  nft: string;
  sysctl: string;
  nsenter: string;
}

/** Tool → the Debian package that ships it. */
export const TOOL_PACKAGES: Readonly<Record<keyof NetworkTools, string>> = {
  ip: "iproute2",
  tc: "iproute2",
  nft: "nftables",
  sysctl: "procps",
  nsenter: "util-linux",
};

/** Where root's tools live, searched after PATH (a service's PATH may lack the sbin dirs). */
const SYSTEM_DIRS = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/** PATH's directories, then the system ones. */
export function toolDirs(searchPath = process.env.PATH ?? ""): string[] {
  return [...searchPath.split(path.delimiter).filter(Boolean), ...SYSTEM_DIRS];
}

/** The absolute path of an executable `name` in the first of `dirs` that has one. */
export function findExecutable(
  name: string,
  dirs: readonly string[] = toolDirs(),
): string | undefined {
  for (const dir of dirs) {
    const file = path.resolve(dir, name);
    try {
      accessSync(file, constants.X_OK);
      return file;
    } catch {
      // not here
    }
  }
  return undefined;
}

/** All tools, or one error naming every missing tool and its package. */
export function findTools(dirs: readonly string[] = toolDirs()): NetworkTools {
  const found: Partial<NetworkTools> = {};
  const missing: Array<keyof NetworkTools> = [];
  for (const tool of Object.keys(TOOL_PACKAGES) as Array<keyof NetworkTools>) {
    const file = findExecutable(tool, dirs);
    if (file) found[tool] = file;
    else missing.push(tool);
  }
  if (missing.length > 0) {
    const named = missing.map((t) => `${t} (Debian package ${TOOL_PACKAGES[t]})`).join(", ");
    const packages = [...new Set(missing.map((t) => TOOL_PACKAGES[t]))].join(" ");
    throw new Error(
      `guest networking needs ${named}: not found in ${dirs.join(":")}; ` +
        `install it with \`apt-get install ${packages}\``,
    );
  }
  return found as NetworkTools;
}
