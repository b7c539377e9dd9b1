import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type PeerLink, TestNamespaces } from "../../host-agent/testing/netns.ts";
import { killGuestsUnder } from "../../host-agent/testing/qemu.ts";
import { TEST_IMAGE } from "../../scripts/oci-image.ts";
import { ensureVmAssets } from "../../scripts/vm-assets.ts";
import { hypeman, REPO_ROOT, waitFor } from "../harness.ts";
import { qemuAgentEnv, type Stack, startStack } from "./env.ts";

// Guests on a real network, through the public API: a QEMU agent whose bridge, TAPs and NAT live
// in a namespace this file creates, a peer namespace beyond it standing for the outside world,
// and requests from the host side of the bridge to the addresses the API reports. Every address
// used here exists only inside these namespaces.
const BUSYBOX = "/bin/busybox";
const PROBE = path.join(REPO_ROOT, "host-agent/testing/net-probe.mjs");
const PEER_PORT = 9000;

// Each guest serves: 7001 its identity (hostname, machine id, draws from its RNG); 7002 an
// echo (a connection held open across a fork); 7003 a relay to the peer, which answers with the
// address it saw. It lists its interfaces once, then counts on the console.
const IDENTITY = [
  'printf "ID %s %s" "$(hostname)" "$(cat /etc/machine-id)"',
  "i=0",
  'while [ $i -lt 16 ]; do read -r u </proc/sys/kernel/random/uuid; printf " %s" $u; i=$((i + 1)); done',
  "echo",
].join("; ");
const program = (peer: string) =>
  [
    // The CRNG is ready from here on (a read of /dev/urandom makes the kernel gather enough).
    "head -c 16 /dev/urandom >/dev/null",
    // 7001: hostname, machine id, and 16 draws in a row from the kernel's CRNG (shell builtins
    // only: no process starts between them to draw numbers of its own).
    `nc -ll -p 7001 -e sh -c '${IDENTITY}' &`,
    "nc -ll -p 7002 -e cat &",
    // 7004: reseed the kernel's RNG now (the init's control helper is visible at /.offshoot), so
    // that a snapshot taken next holds a freshly keyed CRNG the kernel will not reseed on its own
    // for a while: a fork that is not reseeded would then draw exactly its source's numbers.
    `nc -ll -p 7004 -e sh -c '/.offshoot/offshoot-ctl do identity "$(hostname)" - - - "$(cat /etc/machine-id)" "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d " \\n")"' &`,
    `nc -ll -p 7003 -e sh -c 'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 5 ${peer} ${PEER_PORT} | tail -n 1' &`,
    'echo "NETS $(ls /sys/class/net | tr "\\n" " ")"',
    "exec /usr/bin/count",
  ].join("\n");

/** The values two lists have in common. */
const shared = (a: string[], b: string[]) => a.filter((v) => b.includes(v));

describe("guest networking (QEMU) through the API", { timeout: 600_000 }, () => {
  const spaces = new TestNamespaces();
  let ns = "";
  let uplink: PeerLink;
  let stack: Stack;
  let client: ReturnType<typeof hypeman>;

  /** One request to a guest's port from the host side of its bridge; "" when it fails. */
  const ask = async (ip: string, port: number) => {
    try {
      return (await spaces.exec(ns, [BUSYBOX, "nc", "-w", "5", ip, String(port)])).stdout.trim();
    } catch {
      return "";
    }
  };
  const identity = async (ip: string) => {
    const words = await waitFor(
      async () => {
        const w = (await ask(ip, 7001)).split(" ");
        return w[0] === "ID" && w.length === 19 ? w : undefined;
      },
      { timeoutMs: 60_000, what: `${ip}:7001 to answer` },
    );
    return { hostname: words[1], machineId: words[2], uuids: words.slice(3) };
  };

  beforeAll(async () => {
    await ensureVmAssets();
    ns = await spaces.create("net");
    // The peer: its own namespace behind a veth (TEST-NET-1), reachable only through the NAT.
    uplink = await spaces.peer(ns, "192.0.2");
    const peer = spaces.spawn(uplink.peer, [process.execPath, PROBE, "serve", String(PEER_PORT)]);
    await new Promise<void>((resolve, reject) => {
      peer.stdout?.on("data", (d: Buffer) => {
        if (d.toString().includes("listening")) resolve();
      });
      peer.catch(reject);
    });
    stack = await startStack({
      cpEnv: { COMMAND_TIMEOUT_MS: "180000" },
      agents: [qemuAgentEnv({ AGENT_NETNS: ns })],
    });
    client = hypeman(stack.cp.url, stack.apiKey);
  }, 300_000);

  afterAll(async () => {
    // Guests outlive their agent by design; whatever a failed test left running goes here.
    for (const agent of stack?.agents ?? []) await killGuestsUnder(agent.dataDir);
    await spaces.cleanup();
  });

  const create = (name: string, extra: Record<string, unknown> = {}) =>
    client.instances.create({
      name,
      image: TEST_IMAGE,
      size: "128MB",
      vcpus: 1,
      cmd: ["sh", "-c", program(uplink.peerAddress)],
      ...extra,
    });

  it("a source and its forks from Standby and Running: three machines on the network", async () => {
    const src = await create("src", {
      network: { bandwidth_download: "1Gbps", bandwidth_upload: "10MB/s" },
    });
    expect(src.network).toMatchObject({
      enabled: true,
      name: "default",
      ip: expect.stringMatching(/^10\.\d+\.\d+\.\d+$/),
      mac: expect.stringMatching(/^02(:[0-9a-f]{2}){5}$/),
      bandwidth_download: "125MB/s",
      bandwidth_upload: "10MB/s",
    });
    const srcIp = src.network?.ip ?? "";
    const before = await identity(srcIp);
    expect(before.hostname).toBe("src");

    // From Standby: the fork and then its source, restored from one snapshot, each read their
    // RNG first thing.
    const reseedSource = async () =>
      expect(await ask(srcIp, 7004)).toMatch(/^ok identity src - -$/);
    await reseedSource();
    await client.instances.standby("src");
    const cold = await client.instances.fork("src", { name: "fork-sb", target_state: "Running" });
    const coldId = await identity(cold.network?.ip ?? "");
    await client.instances.restore("src");
    const restored = await identity(srcIp);
    // Without a reseed the two would draw one sequence, shifted by whatever else each drew
    // since: their 16 draws would overlap.
    expect(shared(coldId.uuids, restored.uuids)).toEqual([]);

    // From Running, with a connection to the source held open across it.
    const held = spaces.spawn(ns, [BUSYBOX, "nc", srcIp, "7002"], { input: true });
    let echoed = "";
    held.stdout?.on("data", (d: Buffer) => {
      echoed += d.toString();
    });
    try {
      held.stdin?.write("before\n");
      await waitFor(() => echoed.includes("before\n"), { timeoutMs: 30_000, what: "the echo" });
      await reseedSource();
      const hot = await client.instances.fork("src", { name: "fork-run", from_running: true });
      expect(hot.state).toBe("Running");
      const after = await identity(srcIp);
      const hotId = await identity(hot.network?.ip ?? "");
      expect(shared(hotId.uuids, after.uuids)).toEqual([]);
      held.stdin?.write("after\n");
      await waitFor(() => echoed.includes("after\n"), {
        timeoutMs: 30_000,
        what: "the held connection to echo after the fork",
      });

      // Three machines: their own addresses, MACs, hostnames, machine ids and random state.
      const all = [src, cold, hot];
      const ips = all.map((i) => i.network?.ip);
      const macs = all.map((i) => i.network?.mac);
      expect(new Set(ips).size).toBe(3);
      expect(new Set(macs).size).toBe(3);
      expect([after.hostname, coldId.hostname, hotId.hostname]).toEqual([
        "src",
        "fork-sb",
        "fork-run",
      ]);
      expect(new Set([after.machineId, coldId.machineId, hotId.machineId]).size).toBe(3);
      const draws = [before, restored, after, coldId, hotId].flatMap((d) => d.uuids);
      expect(new Set(draws).size).toBe(draws.length);
      // The host side's neighbour table: each address at the MAC the API reports.
      for (const i of all) {
        const neigh = (await spaces.exec(ns, ["ip", "neigh", "show", i.network?.ip ?? ""])).stdout;
        expect(neigh, i.name).toContain(`lladdr ${i.network?.mac}`);
      }
      // Egress: through the host's NAT the peer sees the agent's uplink address, not the guest's.
      expect(await ask(hot.network?.ip ?? "", 7003)).toBe(`remote=${uplink.localAddress}`);
    } finally {
      held.kill();
    }
    for (const name of ["fork-sb", "fork-run", "src"]) await client.instances.delete(name);
    const taps = (await spaces.exec(ns, ["ip", "-o", "link", "show", "type", "tun"])).stdout;
    expect(taps.trim()).toBe("");
  });

  it("network.enabled=false: no NIC in the guest, no address or MAC", async () => {
    const off = await create("no-net", { network: { enabled: false } });
    expect(off.network).toMatchObject({ enabled: false, ip: null, mac: null });
    const nets = await waitFor(
      async () => {
        const lines: string[] = [];
        for await (const l of await client.instances.logs("no-net", { tail: 100 })) lines.push(l);
        return lines.find((l) => l.startsWith("NETS "));
      },
      { timeoutMs: 60_000, what: "the guest to list its interfaces" },
    );
    expect(nets.trim()).toBe("NETS lo");
    await client.instances.delete("no-net");
  });
});
