// Inside a running guest: its agent's channel (one GuestLink per guest, made when a stream first
// needs it) and what its QEMU costs (stats). Standby and stop end every session first, so a
// snapshot holds no half-run command and a fork never inherits one.
import { readFile } from "node:fs/promises";
import { ConflictError, InvalidStateError, type VmmStats } from "@offshoot/shared";
import { GuestLink } from "../../guest/link.ts";
import { isOurQemu } from "./discovery.ts";
import { load, type QemuHost } from "./host.ts";
import type { QemuRecord } from "./store.ts";

/** The guest's agent channel, connected and greeted. */
export async function guestLink(host: QemuHost, id: string, waitMs: number): Promise<GuestLink> {
  const rec = await load(host, id);
  if (rec.observed.state !== "Running" || rec.pid === null) {
    throw new InvalidStateError(
      `instance ${id} is ${rec.observed.state}: the guest agent is reached only while it is Running`,
    );
  }
  if (rec.spec.skip_guest_agent) {
    throw new ConflictError(
      `instance ${rec.spec.name} was created with skip_guest_agent: it has no guest agent`,
    );
  }
  if (!rec.machine.agent_port) {
    throw new ConflictError(
      `instance ${rec.spec.name} was booted by an older agent without the guest agent's channel; stop and start it to get one`,
    );
  }
  const known = host.links.get(id);
  if (known && !known.closed) {
    await known.ready;
    return known;
  }
  const link = new GuestLink(host.paths.agentSocket(id), Math.max(waitMs, 1_000));
  host.links.set(id, link);
  link.whenClosed(() => {
    if (host.links.get(id) === link) host.links.delete(id);
  });
  await link.ready;
  return link;
}

/** Ends every session in the guest (it confirms, so a snapshot taken next holds none) and the
 * channel with `reason`. */
export async function endGuestSessions(host: QemuHost, id: string, reason: string): Promise<void> {
  const link = host.links.get(id);
  if (!link) return;
  host.links.delete(id);
  await link.reset().catch(() => {});
  link.close(reason);
}

const PAGE = 4096;
/** USER_HZ: /proc's clock ticks per second on Linux. */
const TICKS = 100;

/** CPU and memory of the guest's QEMU from /proc, and its TAP's counters. */
export async function vmmStats(host: QemuHost, id: string): Promise<VmmStats> {
  const rec = await load(host, id);
  const pid = rec.pid;
  if (rec.observed.state !== "Running" || pid === null || !isOurQemu(pid, host.paths.qmpSocket(id)))
    throw new InvalidStateError(
      `instance ${id} is ${rec.observed.state}: it has no VMM to measure`,
    );
  const [stat, statm, netdev] = await Promise.all([
    readFile(`/proc/${pid}/stat`, "utf8"),
    readFile(`/proc/${pid}/statm`, "utf8"),
    readFile(`/proc/${pid}/net/dev`, "utf8").catch(() => ""),
  ]);
  // Fields after the command name (which may hold spaces), from field 3 on: utime is 14, stime 15.
  const after = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const ticks = Number(after[11]) + Number(after[12]);
  const [size, resident] = statm.trim().split(/\s+/).map(Number);
  const tap = tapCounters(host, rec, netdev);
  return {
    cpu_seconds: ticks / TICKS,
    memory_rss_bytes: (resident ?? 0) * PAGE,
    memory_vms_bytes: (size ?? 0) * PAGE,
    // The TAP's transmit is what the guest received, and the other way round.
    network_rx_bytes: tap?.tx ?? 0,
    network_tx_bytes: tap?.rx ?? 0,
  };
}

/** The guest's TAP in /proc/<qemu>/net/dev (QEMU runs in the namespace holding it). */
function tapCounters(
  host: QemuHost,
  rec: QemuRecord,
  netdev: string,
): { rx: number; tx: number } | undefined {
  const net = host.options.network;
  if (!net || rec.machine.mac === null) return undefined;
  const name = net.tapName(rec.observed.id);
  for (const line of netdev.split("\n")) {
    const [iface, rest] = line.split(":");
    if (iface?.trim() !== name || rest === undefined) continue;
    const f = rest.trim().split(/\s+/).map(Number);
    return { rx: f[0] ?? 0, tx: f[8] ?? 0 };
  }
  return undefined;
}
