// One real QEMU guest (TCG) on a HostNetwork TAP, in a namespace of the test's own joined by a
// veth pair to a peer namespace ("the internet", reachable only through the masquerade). The
// guest's command configures its eth0 with busybox ip and runs its servers:
//   :80    httpd (the host side reaches the guest)
//   :5001  counts what it receives and answers the count (download, acknowledged end to end)
//   :5002  reads a byte count, sends that many bytes (upload, measured at the receiver)
//   :5003  fetches the peer's HTTP server, which answers with the source address it saw (egress)
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ensureVmAssets } from "../../../scripts/vm-assets.ts";
import { waitFor } from "../../testing/index.ts";
import { type PeerLink, TestNamespaces } from "../../testing/netns.ts";
import { cleanupGuests, type GuestDir, guestDir } from "../../testing/qemu.ts";
import { type LaunchedQemu, launchQemu } from "../drivers/qemu/launch.ts";
import { waitForSerial } from "../drivers/qemu/serial.ts";
import { HostNetwork } from "./index.ts";

const PROBE = path.join(
  path.dirname(fileURLToPath(import.meta.url)),
  "../../testing/net-probe.mjs",
);
const SUBNET = "10.213.7.0/24";
const GATEWAY = "10.213.7.1";
const GUEST = "10.213.7.2";
/** The veth between the agent's namespace (.1) and the peer (.2). */
const OUTSIDE = "198.18.7";
const INSTANCE = "netguest0instance1";
const BOOT_TIMEOUT = 90_000;
/** B/s each way: a TCG guest manages 9–16 MB/s unlimited here (upload is the slower). */
const RATE = 2_000_000;
/** Five seconds at RATE: the TBF's initial burst (68 KiB) is ~1 % of it. */
const LIMITED_BYTES = 5 * RATE;

const GUEST_COMMAND = [
  `ip addr add ${GUEST}/24 dev eth0 && ip link set eth0 up && ip route add default via ${GATEWAY} || echo NET-FAILED`,
  "mkdir -p /tmp/www && echo hello from the guest > /tmp/www/index.html && httpd -p 80 -h /tmp/www",
  "nc -ll -p 5001 -e wc -c &",
  `nc -ll -p 5002 -e sh -c 'read n; head -c "$n" /dev/zero' &`,
  `nc -ll -p 5003 -e wget -qO- http://${OUTSIDE}.2:8080/ &`,
  "echo NET-READY; wait",
].join("\n");

const spaces = new TestNamespaces();
const vms: LaunchedQemu[] = [];
const dirs: GuestDir[] = [];
let ns: string;
let net: HostNetwork;
let outside: PeerLink;
let tap: string;
/** What the peer's server saw, one entry per request. */
const peerSaw: string[] = [];

/** Runs net-probe.mjs in a namespace and parses its JSON line. */
async function probe<T>(where: string, ...args: string[]): Promise<T> {
  const { stdout } = await spaces.exec(where, [process.execPath, PROBE, ...args], {
    timeoutMs: 60_000,
  });
  return JSON.parse(stdout.trim().split("\n").at(-1) ?? "") as T;
}

/** Whether a drop rule of the host's table (by its comment) has counted a packet. */
async function dropped(comment: string): Promise<boolean> {
  const m = new RegExp(`counter packets (\\d+) bytes \\d+ drop comment "${comment}"`).exec(
    (await net.ruleset()) ?? "",
  );
  if (!m) throw new Error(`no counted drop rule "${comment}" in the host's table`);
  return Number(m[1]) > 0;
}

/** Polls until the guest's httpd answers (the guest's network is up). */
async function untilGuestAnswers(timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await probe<{ connected?: boolean; error?: string }>(ns, "connect", GUEST, "80");
    if (r.connected) return;
    if (Date.now() > deadline) throw new Error(`guest ${GUEST}:80 not reachable: ${r.error}`);
    await new Promise((res) => setTimeout(res, 200));
  }
}

beforeAll(async () => {
  const assets = await ensureVmAssets();
  ns = spaces.reserve("guest");
  net = await HostNetwork.open({ netns: ns, createNetns: true });
  await net.ensureSubnet(SUBNET);
  outside = await spaces.peer(ns, OUTSIDE);
  // The peer's HTTP server, reporting each request's source address.
  const server = spaces.spawn(outside.peer, [process.execPath, PROBE, "serve", "8080"]);
  await new Promise<void>((resolve, reject) => {
    let buf = "";
    server.stdout?.setEncoding("utf8");
    server.stdout?.on("data", (d: string) => {
      buf += d;
      for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
        const line = JSON.parse(buf.slice(0, nl)) as { listening?: number; remote?: string };
        buf = buf.slice(nl + 1);
        if (line.listening) resolve();
        if (line.remote) peerSaw.push(line.remote);
      }
    });
    void server.then((r) => reject(new Error(`peer server ended: ${r.exitCode} ${r.stderr}`)));
  });

  tap = await net.ensureTap(INSTANCE, { downloadBps: null, uploadBps: null });
  const d = guestDir(assets);
  dirs.push(d);
  const vm = await launchQemu(
    d.spec({
      command: GUEST_COMMAND,
      execPrefix: net.execPrefix,
      extraArgs: [
        "-netdev",
        `tap,id=net0,ifname=${tap},script=no,downscript=no`,
        "-device",
        "virtio-net-device,netdev=net0,mac=02:00:0a:d5:07:02",
      ],
    }),
  );
  vms.push(vm);
  const gone = new AbortController();
  void vm.exited.then((r) => gone.abort(new Error(`QEMU exited: ${JSON.stringify(r)}`)));
  await waitForSerial(
    vm.serialLog,
    (log) => {
      if (log.includes("NET-FAILED")) throw new Error(`guest network setup failed:\n${log}`);
      return log.includes("NET-READY") || undefined;
    },
    { timeoutMs: BOOT_TIMEOUT, signal: gone.signal },
  );
  await untilGuestAnswers(20_000);
}, BOOT_TIMEOUT + 60_000);

afterAll(async () => {
  await cleanupGuests(vms, dirs);
  await spaces.cleanup();
});

describe("a guest on the host network", () => {
  it("is reachable from the namespace's side at its address", async () => {
    const r = await probe<{ status: number; body: string }>(ns, "get", `http://${GUEST}/`);
    expect(r).toEqual({ status: 200, body: "hello from the guest\n" });
  });

  it("reaches the outside through the masquerade, which the outside sees as the source", async () => {
    const r = await probe<{ bytes: number }>(ns, "recv", GUEST, "5003");
    expect(r.bytes).toBeGreaterThan(0);
    // The peer has no route to the guest subnet: only the masquerade makes the reply come back.
    expect(peerSaw).toEqual([`${OUTSIDE}.1`]);
  });

  it("cannot be reached from outside the namespace, even by a peer with a route to it", async () => {
    await spaces.exec(outside.peer, ["ip", "route", "add", SUBNET, "via", `${OUTSIDE}.1`]);
    const attempt = spaces.spawn(outside.peer, [process.execPath, PROBE, "connect", GUEST, "80"]);
    let said = "";
    attempt.stdout?.on("data", (d: Buffer) => {
      said += d.toString();
    });
    try {
      // The forward chain's "new inbound" counter shows the SYN dropped (the connection attempt
      // itself would only give up after minutes of retries).
      await waitFor("the peer's SYN to be dropped", async () => dropped("new inbound"), 20_000, 50);
      expect(said).toBe("");
    } finally {
      attempt.kill("SIGKILL");
      await attempt;
      await spaces.exec(outside.peer, ["ip", "route", "del", SUBNET]);
    }
  });

  it("is limited to the rates set, in both directions", async () => {
    // Unlimited first: the guest must manage well above the limit, or the limit is not what the
    // limited run measures.
    const unlimited = await measure(4_000_000);
    await net.ensureTap(INSTANCE, { downloadBps: RATE, uploadBps: RATE });
    const limited = await measure(LIMITED_BYTES);
    await net.ensureTap(INSTANCE, { downloadBps: null, uploadBps: null });
    console.log(
      `guest throughput, B/s: unlimited ${JSON.stringify(unlimited)}; ` +
        `limited to ${RATE} both ways ${JSON.stringify(limited)}`,
    );
    expect(unlimited.download).toBeGreaterThan(RATE * 1.25);
    expect(unlimited.upload).toBeGreaterThan(RATE * 1.25);
    for (const rate of [limited.download, limited.upload]) {
      expect(rate).toBeGreaterThan(RATE * 0.8);
      expect(rate).toBeLessThan(RATE * 1.2);
    }
  }, 120_000);
});

/** Download (host side → guest, acknowledged by the guest's byte count) and upload (guest →
 * host side, timed at the receiver) of `bytes` each, in B/s. */
async function measure(bytes: number): Promise<{ download: number; upload: number }> {
  const down = await probe<{ bytes: number; ms: number; reply: string }>(
    ns,
    "send",
    GUEST,
    "5001",
    String(bytes),
  );
  expect(down.reply).toBe(String(bytes));
  const up = await probe<{ bytes: number; ms: number }>(ns, "recv", GUEST, "5002", String(bytes));
  expect(up.bytes).toBe(bytes);
  return {
    download: Math.round(bytes / (down.ms / 1000)),
    upload: Math.round(bytes / (up.ms / 1000)),
  };
}
