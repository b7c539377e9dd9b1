// A guest's NIC, host side. A guest whose spec carries its host's subnet gets a TAP on this
// host's bridge (host-agent/src/network/): made (or adopted, after an agent restart) before its
// QEMU starts, its bandwidth limits applied, and removed with the instance. A guest from before
// guest subnets, or on a driver given no host network (tests of other things), gets QEMU's
// user-mode NIC with restrict=on: a device for the guest, no path off it.
import type { QemuHost } from "./host.ts";
import type { QemuRecord } from "./store.ts";

/** Whether this guest's NIC is a TAP on the host's bridge. */
function bridged(host: QemuHost, rec: QemuRecord): boolean {
  return rec.machine.mac !== null && rec.spec.network.subnet !== null && !!host.options.network;
}

/** The `-netdev` value for the guest's NIC (null: it has none). */
export function netdevOf(host: QemuHost, rec: QemuRecord): string | null {
  if (rec.machine.mac === null) return null;
  const net = host.options.network;
  if (!bridged(host, rec) || !net) return "user,id=net0,restrict=on";
  // No vhost: these hosts have no /dev/vhost-net (QEMU does the virtio queues itself).
  return `tap,id=net0,ifname=${net.tapName(rec.observed.id)},script=no,downscript=no`;
}

/**
 * Before QEMU starts: the host's bridge for the guest's subnet, and the guest's TAP with its
 * limits. Both are idempotent, and each is asked once per agent life (a fork's TAP is made while
 * its disk is cloned, so its restore finds it ready); a failure is asked again next time.
 */
export function prepareNic(host: QemuHost, rec: QemuRecord): Promise<void> {
  const net = host.options.network;
  const subnet = rec.spec.network.subnet;
  if (!bridged(host, rec) || !net || subnet === null) return Promise.resolve();
  const id = rec.observed.id;
  const limits = {
    downloadBps: rec.spec.network.bandwidth_download_bps,
    uploadBps: rec.spec.network.bandwidth_upload_bps,
  };
  const key = JSON.stringify(limits);
  const known = host.nics.get(id);
  if (known?.key === key) return known.ready;
  const ready = once(host.subnets, subnet, () => net.ensureSubnet(subnet)).then(async () => {
    await net.ensureTap(id, limits);
  });
  host.nics.set(id, { key, ready });
  ready.catch(() => {
    if (host.nics.get(id)?.ready === ready) host.nics.delete(id);
  });
  return ready;
}

/** `make()` once per key while it has not failed. */
function once(cache: Map<string, Promise<void>>, key: string, make: () => Promise<void>) {
  const known = cache.get(key);
  if (known) return known;
  const p = make();
  cache.set(key, p);
  p.catch(() => cache.delete(key));
  return p;
}

/** With the instance: its TAP (and the rules on it), once any preparation of it has ended. */
export async function removeNic(host: QemuHost, id: string): Promise<void> {
  await host.nics.get(id)?.ready.catch(() => {});
  host.nics.delete(id);
  await host.options.network?.removeTap(id);
}

/** At agent start: every instance's TAP made again or adopted as it is (never a second one),
 * and the TAPs of instances this host no longer has (a delete cut short) removed. An instance
 * whose TAP cannot be made now is named in `failed` (its next launch tries again); the agent
 * starts anyway. */
export async function adoptNics(
  host: QemuHost,
): Promise<{ taps: number; removed: number; failed: string[] }> {
  const net = host.options.network;
  if (!net) return { taps: 0, removed: 0, failed: [] };
  const keep = new Set<string>();
  const failed: string[] = [];
  for (const id of await host.store.ids()) {
    const read = await host.store.read(id);
    // An unreadable record's TAP, if any, is kept for whoever repairs it.
    if (read.kind === "ok" && !bridged(host, read.record)) continue;
    keep.add(net.tapName(id));
    if (read.kind !== "ok") continue;
    await prepareNic(host, read.record).catch((e: unknown) => {
      failed.push(`${id}: ${e instanceof Error ? e.message : String(e)}`);
    });
  }
  const stale = (await net.listTaps()).filter((t) => !keep.has(t));
  for (const tap of stale) await net.removeTapNamed(tap);
  return { taps: keep.size, removed: stale.length, failed };
}
