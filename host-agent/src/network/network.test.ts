// HostNetwork against real kernel objects, in a namespace of the test's own (nothing touches
// the machine's namespace: its ip_forward is checked unchanged at the end).
import { mkdtempSync, readFileSync, rmSync, symlinkSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { waitFor } from "../../testing/index.ts";
import { listNetns, TestNamespaces } from "../../testing/netns.ts";
import { HostNetwork, parseSubnet } from "./index.ts";
import { burstBytes, MAX_RATE_BPS, MIN_BURST_BYTES, tbf } from "./rates.ts";
import { findExecutable, findTools } from "./tools.ts";

const spaces = new TestNamespaces();
let ns: string;
let net: HostNetwork;
const rootForwarding = readFileSync("/proc/sys/net/ipv4/ip_forward", "utf8");

beforeAll(async () => {
  ns = spaces.reserve("net");
  net = await HostNetwork.open({ netns: ns, createNetns: true });
});

afterAll(async () => {
  await spaces.cleanup();
  expect(await listNetns()).not.toContain(ns);
  expect(readFileSync("/proc/sys/net/ipv4/ip_forward", "utf8")).toBe(rootForwarding);
});

const sh = async (...argv: string[]) => (await spaces.exec(ns, argv)).stdout;
const json = async <T>(...argv: string[]) => JSON.parse(await sh(...argv)) as T;

interface Link {
  ifname: string;
  ifindex: number;
  master?: string;
  flags: string[];
  linkinfo?: { info_kind?: string };
}
const links = () => json<Link[]>("ip", "-j", "-d", "link", "show");
const inetAddrs = async (dev: string) =>
  (
    await json<Array<{ addr_info: Array<{ family: string; local: string; prefixlen: number }> }>>(
      "ip",
      "-j",
      "addr",
      "show",
      "dev",
      dev,
    )
  )
    .flatMap((l) => l.addr_info)
    .filter((a) => a.family === "inet")
    .map((a) => `${a.local}/${a.prefixlen}`);
const isolated = async (dev: string) =>
  (await sh("bridge", "-d", "link", "show", "dev", dev)).includes("isolated on");
const qdiscs = (dev: string) =>
  json<Array<{ kind: string; root?: boolean; options?: { rate?: number; burst?: number } }>>(
    "tc",
    "-j",
    "qdisc",
    "show",
    "dev",
    dev,
  );

describe("parseSubnet and rates", () => {
  it("takes the first host address as gateway and refuses what is not a network", () => {
    expect(parseSubnet("10.64.16.0/20")).toEqual({
      cidr: "10.64.16.0/20",
      network: "10.64.16.0",
      prefixLength: 20,
      gateway: "10.64.16.1",
      lastHost: "10.64.31.254",
    });
    expect(() => parseSubnet("10.64.16.5/20")).toThrow(/host bits set.*10\.64\.16\.0\/20/);
    expect(() => parseSubnet("10.64.16.0/31")).toThrow(/len 8–30/);
    expect(() => parseSubnet("300.1.1.0/24")).toThrow(/invalid guest subnet/);
    expect(() => parseSubnet("fd00::/64")).toThrow(/invalid guest subnet/);
  });

  it("passes rates to tc in bits with a burst of at least 64 KiB", () => {
    expect(tbf(2_000_000)).toEqual([
      "tbf",
      "rate",
      "16000000bit",
      "burst",
      "69632",
      "latency",
      "50ms",
    ]);
    expect(burstBytes(100_000_000)).toBe(2_000_000);
    expect(burstBytes(1_000)).toBe(MIN_BURST_BYTES);
  });
});

describe("HostNetwork.open", () => {
  it("names a missing tool and its Debian package", () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), "onet-"));
    try {
      for (const t of ["ip", "tc", "sysctl", "nsenter"]) {
        symlinkSync(findExecutable(t) as string, path.join(dir, t));
      }
      expect(() => findTools([dir])).toThrow(
        /needs nft \(Debian package nftables\).*apt-get install nftables/,
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("refuses a missing namespace unless asked to create it", async () => {
    const missing = spaces.reserve("missing");
    await expect(HostNetwork.open({ netns: missing })).rejects.toThrow(
      new RegExp(`network namespace "${missing}" does not exist`),
    );
    await expect(HostNetwork.open({ netns: "../etc" })).rejects.toThrow(
      /invalid network namespace/,
    );
    expect(net.execPrefix).toEqual([findExecutable("nsenter"), `--net=/run/netns/${ns}`, "--"]);
  });
});

describe("HostNetwork in a namespace", () => {
  it("ensureSubnet is idempotent: one bridge, one address, the same nft table", async () => {
    await net.ensureSubnet("10.213.0.0/24");
    const first = await net.ruleset();
    await net.ensureSubnet("10.213.0.0/24");
    const bridges = (await links()).filter((l) => l.linkinfo?.info_kind === "bridge");
    expect(bridges.map((b) => b.ifname)).toEqual([net.bridge]);
    expect(bridges[0]?.flags).toContain("UP");
    expect(await inetAddrs(net.bridge)).toEqual(["10.213.0.1/24"]);
    expect(await net.ruleset()).toBe(first);
    expect(first?.match(/masquerade/g)).toHaveLength(1);
    expect(first).toContain('ip saddr 10.213.0.0/24 oifname != "offshoot0" masquerade');
    expect(first?.match(/\bdrop\b/g)).toHaveLength(3);
    expect((await sh("nft", "list", "tables")).trim().split("\n")).toEqual(["table ip offshoot"]);
    expect((await sh("sysctl", "-n", "net.ipv4.ip_forward")).trim()).toBe("1");
  });

  it("re-addresses the bridge for another subnet", async () => {
    await net.ensureSubnet("10.213.0.0/24");
    await net.ensureSubnet("10.214.16.0/20");
    expect(await inetAddrs(net.bridge)).toEqual(["10.214.16.1/20"]);
    const rules = await net.ruleset();
    expect(rules).toContain("ip saddr 10.214.16.0/20");
    expect(rules).not.toContain("10.213.0.0");
    await net.ensureSubnet("10.213.0.0/24");
    expect(await inetAddrs(net.bridge)).toEqual(["10.213.0.1/24"]);
  });

  it("ensureTap is idempotent and replaces, then removes, the limits", async () => {
    await net.ensureSubnet("10.213.0.0/24");
    const id = "k3xq9example0instance01";
    const tap = await net.ensureTap(id, { downloadBps: 2_000_000, uploadBps: 1_000_000 });
    expect(tap).toBe("otk3xq9example0");
    expect(net.tapName(id)).toBe(tap);
    const before = (await links()).find((l) => l.ifname === tap);
    expect(await net.ensureTap(id, { downloadBps: 3_000_000, uploadBps: 500_000 })).toBe(tap);
    const all = await links();
    expect(all.filter((l) => l.ifname === tap)).toHaveLength(1);
    expect(all.find((l) => l.ifname === tap)?.ifindex).toBe(before?.ifindex);
    expect(all.find((l) => l.ifname === tap)?.master).toBe(net.bridge);
    expect(await isolated(tap)).toBe(true);
    expect(await net.limits(id)).toEqual({ downloadBps: 3_000_000, uploadBps: 500_000 });
    // What tc itself shows (its JSON rates are bytes per second).
    const root = (await qdiscs(tap)).find((q) => q.root);
    expect(root).toMatchObject({ kind: "tbf", options: { rate: 3_000_000 } });
    expect(root?.options?.burst).toBeGreaterThanOrEqual(65536);
    expect((await qdiscs(tap)).map((q) => q.kind).sort()).toEqual(["ingress", "tbf"]);
    expect((await qdiscs(`oi${tap.slice(2)}`)).find((q) => q.root)).toMatchObject({
      kind: "tbf",
      options: { rate: 500_000 },
    });
    const filters = await json<unknown[]>(
      "tc",
      "-j",
      "filter",
      "show",
      "dev",
      tap,
      "parent",
      "ffff:",
    );
    expect(JSON.stringify(filters).match(/"mirred"/g)).toHaveLength(1);

    await net.ensureTap(id, { downloadBps: null, uploadBps: 700_000 });
    expect(await net.limits(id)).toEqual({ downloadBps: null, uploadBps: 700_000 });
    await net.ensureTap(id, { downloadBps: null, uploadBps: null });
    expect(await net.limits(id)).toEqual({ downloadBps: null, uploadBps: null });
    expect((await qdiscs(tap)).map((q) => q.kind)).not.toContain("tbf");
    expect((await qdiscs(tap)).map((q) => q.kind)).not.toContain("ingress");
    expect((await links()).map((l) => l.ifname)).not.toContain(`oi${tap.slice(2)}`);
    expect(await net.listTaps()).toEqual([tap]);
  });

  it("concurrent ensureTaps of one instance make one TAP", async () => {
    await net.ensureSubnet("10.213.0.0/24");
    const limits = { downloadBps: 1_000_000, uploadBps: 1_000_000 };
    const taps = await Promise.all([1, 2, 3].map(() => net.ensureTap("racer", limits)));
    expect(new Set(taps)).toEqual(new Set(["otracer"]));
    expect((await links()).filter((l) => l.ifname === "otracer")).toHaveLength(1);
    await Promise.all([net.removeTap("racer"), net.removeTap("racer")]);
    expect(await net.listTaps()).not.toContain("otracer");
  });

  it("refuses limits out of range and TAP names an id cannot make, changing nothing", async () => {
    await expect(net.ensureTap("rangecheck", { downloadBps: 0, uploadBps: null })).rejects.toThrow(
      /download limit 0 B\/s is out of range/,
    );
    await expect(
      net.ensureTap("rangecheck", { downloadBps: null, uploadBps: MAX_RATE_BPS + 1 }),
    ).rejects.toThrow(/upload limit/);
    expect(() => net.tapName("a/b")).toThrow(/cannot name a TAP/);
    expect(await net.listTaps()).not.toContain("otrangecheck");
  });

  it("removeTap removes the TAP and its IFB; absent is fine", async () => {
    await net.ensureSubnet("10.213.0.0/24");
    const tap = await net.ensureTap("removeme", { downloadBps: 1_000_000, uploadBps: 1_000_000 });
    const names = async () => (await links()).map((l) => l.ifname);
    expect(await names()).toEqual(expect.arrayContaining([tap, "oiremoveme"]));
    await net.removeTap("removeme");
    expect(await names()).not.toContain(tap);
    expect(await names()).not.toContain("oiremoveme");
    await net.removeTap("removeme");
    expect(await net.listTaps()).not.toContain(tap);
  });

  it("a fresh HostNetwork (agent restart) adopts the TAPs and limits it finds", async () => {
    await net.ensureSubnet("10.213.0.0/24");
    const a = await net.ensureTap("survivor01", { downloadBps: 4_000_000, uploadBps: 2_000_000 });
    const b = await net.ensureTap("survivor02", { downloadBps: null, uploadBps: null });
    const before = await links();
    const again = await HostNetwork.open({ netns: ns });
    expect(await again.listTaps()).toEqual(expect.arrayContaining([a, b]));
    expect(await again.limits("survivor01")).toEqual({
      downloadBps: 4_000_000,
      uploadBps: 2_000_000,
    });
    await again.ensureSubnet("10.213.0.0/24");
    await again.ensureTap("survivor01", { downloadBps: 4_000_000, uploadBps: 2_000_000 });
    await again.ensureTap("survivor02", { downloadBps: null, uploadBps: null });
    const after = await links();
    const index = (ls: Link[]) => Object.fromEntries(ls.map((l) => [l.ifname, l.ifindex]));
    expect(index(after)).toEqual(index(before));
    // An IFB whose TAP is gone (a crash between the two removals) still shows for collection.
    await sh("ip", "link", "delete", "dev", b);
    await sh("ip", "link", "add", "name", "oisurvivor02", "type", "ifb");
    expect(await again.listTaps()).toContain(b);
    await again.removeTapNamed(b);
    expect((await links()).map((l) => l.ifname)).not.toContain("oisurvivor02");
    for (const id of ["survivor01", "k3xq9example0instance01"]) await again.removeTap(id);
    expect(await again.listTaps()).toEqual([]);
  });

  it("drops bridged guest-to-guest traffic in the forward chain even without the port flag", async () => {
    // Two stand-in guests: namespaces on veth ports of the bridge, *not* isolated, so only the
    // forward chain's bridge → bridge rule (through br_netfilter) stands between them.
    await net.ensureSubnet("10.213.0.0/24");
    const guests = [await spaces.create("ga"), await spaces.create("gb")];
    for (const [i, g] of guests.entries()) {
      await sh("ip", "link", "add", `vg${i}`, "type", "veth", "peer", "name", "eth0", "netns", g);
      await sh("ip", "link", "set", "dev", `vg${i}`, "master", net.bridge, "up");
      await spaces.exec(g, ["ip", "addr", "add", `10.213.0.${10 + i}/24`, "dev", "eth0"]);
      await spaces.exec(g, ["ip", "link", "set", "dev", "eth0", "up"]);
    }
    const [a, b] = guests as [string, string];
    // The gateway answers (local traffic, not forwarded)...
    await spaces.exec(a, ["/bin/busybox", "ping", "-c", "1", "-W", "5", "10.213.0.1"]);
    // ...the other guest's pings reach the forward hook and are counted as dropped there.
    const ping = spaces.spawn(a, ["/bin/busybox", "ping", "10.213.0.11"]);
    await waitFor("a guest-to-guest drop", async () =>
      /counter packets [1-9]\d* bytes \d+ drop comment "guest to guest"/.test(
        (await net.ruleset()) ?? "",
      ),
    );
    ping.kill("SIGKILL");
    await ping;
    await spaces.exec(b, ["ip", "link", "set", "dev", "eth0", "down"]);
    for (const i of [0, 1]) await sh("ip", "link", "delete", "dev", `vg${i}`);
  });

  it("ensureTap without a bridge says ensureSubnet comes first", async () => {
    const other = await HostNetwork.open({ netns: ns, bridge: "nobridge0" });
    await expect(other.ensureTap("orphan", { downloadBps: null, uploadBps: null })).rejects.toThrow(
      /no bridge nobridge0.*ensureSubnet comes first/,
    );
  });
});
