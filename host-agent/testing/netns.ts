// Network namespaces for tests and benchmarks: uniquely named ones (prefix oft-) so that nothing
// touches the machine's own namespace, an optional peer namespace joined by a veth pair (the
// "internet" a guest's egress goes to), commands and servers run inside them, and a cleanup that
// stops those servers and deletes the namespaces (their devices go with them).
import { randomBytes } from "node:crypto";
import { statSync } from "node:fs";
import path from "node:path";
import { execa, type ResultPromise } from "execa";
import { deleteNetns, ensureNetns, netnsPrefix } from "../src/network/netns.ts";
import { type RunOptions, type RunResult, runOk } from "../src/network/run.ts";

export const TEST_NETNS_PREFIX = "oft-";
/** Set by test/global-setup.ts for one `vitest run` (its workers inherit it): the namespaces of
 * that run are named oft-<run>-…, so its teardown deletes its own and not those of another run
 * going on beside it on the same machine. */
export const TEST_RUN_ENV = "OFFSHOOT_TEST_RUN";
/** An oft-* namespace of no run of ours older than this is what a killed run left behind. */
export const STALE_NETNS_MS = 60 * 60_000;

/** The tools the namespace functions run, found in PATH. */
const TOOLS = { ip: "ip", nsenter: "nsenter" };
const netnsArgs = (ns: string) => netnsPrefix(TOOLS, ns);

/** Names of the namespaces `ip netns list` shows. */
export async function listNetns(): Promise<string[]> {
  const { stdout } = await runOk(["ip", "netns", "list"]);
  return stdout
    .split("\n")
    .map((l) => l.split(" ")[0] ?? "")
    .filter(Boolean);
}

function runPrefix(run = process.env[TEST_RUN_ENV]): string {
  return run ? `${TEST_NETNS_PREFIX}${run}-` : TEST_NETNS_PREFIX;
}

/** Deletes the oft-* namespaces that this run (TEST_RUN_ENV) left behind, and those older than
 * STALE_NETNS_MS (a run killed before its teardown); returns their names. */
export async function deleteLeftoverTestNetns(run = process.env[TEST_RUN_ENV]): Promise<string[]> {
  const ours = runPrefix(run);
  const left = (await listNetns()).filter((n) => {
    if (!n.startsWith(TEST_NETNS_PREFIX)) return false;
    if (run && n.startsWith(ours)) return true;
    try {
      return Date.now() - statSync(path.join("/run/netns", n)).mtimeMs > STALE_NETNS_MS;
    } catch {
      return false;
    }
  });
  for (const ns of left) await deleteNetns(TOOLS, ns);
  return left;
}

export interface PeerLink {
  /** The peer namespace's name. */
  peer: string;
  /** Address (no prefix length) of each side. */
  localAddress: string;
  peerAddress: string;
  /** The veth device inside each namespace. */
  localDev: string;
  peerDev: string;
}

export class TestNamespaces {
  private readonly names: string[] = [];
  private readonly servers: ResultPromise[] = [];

  /** A unique name for a namespace someone else creates (e.g. HostNetwork.open), deleted by
   * cleanup if it exists then. */
  reserve(tag = "t"): string {
    const ns = `${runPrefix()}${tag}-${randomBytes(4).toString("hex")}`;
    this.names.push(ns);
    return ns;
  }

  /** A new namespace, oft-[run-]<tag>-<random>, with loopback up. */
  async create(tag = "t"): Promise<string> {
    const ns = this.reserve(tag);
    await ensureNetns(TOOLS, ns, true);
    return ns;
  }

  /** A new peer namespace joined to `ns` by a veth pair on a /24 (`net` like "198.18.7"):
   * ns gets .1, the peer .2. The veth is made inside `ns`, never in the root namespace. */
  async peer(ns: string, net: string, tag = "peer"): Promise<PeerLink> {
    const peer = await this.create(tag);
    const link: PeerLink = {
      peer,
      localAddress: `${net}.1`,
      peerAddress: `${net}.2`,
      localDev: "vpeer",
      peerDev: "vlocal",
    };
    await runOk(
      ["ip", "-n", ns, "link", "add", link.localDev, "type", "veth", "peer", "name"].concat([
        link.peerDev,
        "netns",
        peer,
      ]),
    );
    await runOk(["ip", "-n", ns, "addr", "add", `${link.localAddress}/24`, "dev", link.localDev]);
    await runOk(["ip", "-n", peer, "addr", "add", `${link.peerAddress}/24`, "dev", link.peerDev]);
    await runOk(["ip", "-n", ns, "link", "set", "dev", link.localDev, "up"]);
    await runOk(["ip", "-n", peer, "link", "set", "dev", link.peerDev, "up"]);
    return link;
  }

  /** Runs a command inside the namespace; it must succeed. */
  exec(
    ns: string,
    argv: readonly string[],
    opts?: Omit<RunOptions, "tolerate">,
  ): Promise<RunResult> {
    return runOk([...netnsArgs(ns), ...argv], opts);
  }

  /** Starts a long-running process inside the namespace (killed by cleanup); `input: true`
   * gives it a stdin pipe to write to. */
  spawn(ns: string, argv: readonly string[], opts: { input?: boolean } = {}): ResultPromise {
    const [file, ...args] = [...netnsArgs(ns), ...argv];
    const stdin = opts.input ? "pipe" : "ignore";
    const sub = execa(file as string, args, { reject: false, stdin, buffer: false });
    this.servers.push(sub);
    return sub;
  }

  /** Stops the spawned processes and deletes every namespace made or adopted here. */
  async cleanup(): Promise<void> {
    for (const s of this.servers.splice(0)) {
      s.kill("SIGKILL");
      await s;
    }
    for (const ns of this.names.splice(0)) await deleteNetns(TOOLS, ns);
  }
}
