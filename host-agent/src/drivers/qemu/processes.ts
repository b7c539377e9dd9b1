// An instance's QEMU process and its files: QMP connections, quitting and killing, removing an
// instance whole, and collecting the bases no instance uses any more. No locks, no step journal:
// the verbs that call these add those.
import { readFileSync } from "node:fs";
import { mkdir, readFile, rm } from "node:fs/promises";
import { setTimeout as sleep } from "node:timers/promises";
import { ApiError } from "@offshoot/shared";
import { isMissing } from "../record-store.ts";
import { releaseThawed } from "./compression.ts";
import { isOurQemu, qemuPidsFor } from "./discovery.ts";
import { gcBases, gcMemBases } from "./disks.ts";
import type { QemuHost } from "./host.ts";
import { killProcess } from "./launch.ts";
import { removeNic } from "./nic.ts";
import { QmpClient } from "./qmp.ts";

export const QUIT_TIMEOUT_MS = 10_000;

/** The instance's QMP connection, opened again if it was closed. */
export async function qmpFor(host: QemuHost, id: string): Promise<QmpClient> {
  const open = host.qmps.get(id);
  if (open && !open.isClosed) return open;
  const client = await QmpClient.connect(host.paths.qmpSocket(id), { timeoutMs: 5_000 });
  host.qmps.set(id, client);
  return client;
}

export async function closeQmp(host: QemuHost, id: string): Promise<void> {
  const c = host.qmps.get(id);
  host.qmps.delete(id);
  await c?.close();
}

/** `quit` over QMP (a busybox init ignores ACPI powerdown), SIGKILL after a bound. */
export async function quit(host: QemuHost, id: string, pid: number): Promise<void> {
  const sock = host.paths.qmpSocket(id);
  if (isOurQemu(pid, sock)) {
    try {
      const qmp = await qmpFor(host, id);
      await qmp.execute("quit").catch((e: unknown) => {
        // QEMU may close the connection before answering; it is quitting either way.
        if (!(e instanceof Error && e.name === "QmpClosedError")) throw e;
      });
    } catch {
      // No QMP: fall through to the bounded wait and SIGKILL.
    }
  }
  await waitGone(host, id, pid, QUIT_TIMEOUT_MS);
  await closeQmp(host, id);
}

export async function kill(host: QemuHost, id: string, pid: number): Promise<void> {
  await waitGone(host, id, pid, 0);
  await closeQmp(host, id);
}

/** Waits up to `ms` for the process to end, then SIGKILLs it and waits for that. */
export async function waitGone(host: QemuHost, id: string, pid: number, ms: number): Promise<void> {
  const sock = host.paths.qmpSocket(id);
  const deadline = Date.now() + ms;
  while (isOurQemu(pid, sock) && Date.now() < deadline) await sleep(50);
  if (!isOurQemu(pid, sock)) return;
  killProcess(pid);
  const hard = Date.now() + 5_000;
  while (isOurQemu(pid, sock)) {
    if (Date.now() >= hard) throw new Error(`QEMU pid ${pid} survived SIGKILL`);
    await sleep(20);
  }
}

export async function dropMemory(host: QemuHost, id: string): Promise<void> {
  await rm(host.paths.memFile(id), { force: true });
  await rm(host.paths.devStateFile(id), { force: true });
}

export async function makeInstanceDir(host: QemuHost, id: string): Promise<void> {
  await mkdir(host.paths.instancesDir, { recursive: true });
  try {
    await mkdir(host.paths.instanceDir(id));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "EEXIST") {
      throw new ApiError("conflict", `instance ${id} already exists on this host`);
    }
    throw e;
  }
  const sock = host.paths.qmpSocket(id);
  if (!sock.startsWith(host.paths.instanceDir(id))) {
    await mkdir(sock.slice(0, sock.lastIndexOf("/")), { recursive: true });
  }
}

/** Kills the instance's QEMU (found by record or pid file) and removes its files. */
export async function discard(host: QemuHost, id: string): Promise<void> {
  const pids = new Set<number>();
  const read = await host.store.read(id);
  if (read.kind === "ok" && read.record.pid !== null) pids.add(read.record.pid);
  try {
    const n = Number.parseInt(await readFile(host.paths.pidFile(id), "utf8"), 10);
    if (Number.isInteger(n) && n > 0) pids.add(n);
  } catch (e) {
    if (!isMissing(e)) throw e;
  }
  for (const pid of qemuPidsFor(host.paths.qmpSocket(id))) pids.add(pid);
  for (const pid of pids) await kill(host, id, pid);
  await closeQmp(host, id);
  // A snapshot has no TAP; a restore's new files share their instance's.
  if (host.paths === host.views.instances.paths) await removeNic(host, id);
  await host.store.remove(id);
}

/** Removes disk and memory bases no instance refers to any more (after a delete: the only
 * thing that shortens disk chains; reading them costs a `qemu-img` per instance). */
export async function gc(host: QemuHost): Promise<void> {
  await gcBases(host.paths, holders(host));
  await gcMemory(host);
}

/** Removes memory bases no record refers to (a guest stopped, snapshotted or restored off
 * one; disk chains are untouched then), after compressed snapshots have given up the copies no
 * fork uses any more. */
export async function gcMemory(host: QemuHost): Promise<void> {
  const stores = holders(host).map((h) => h.store);
  await releaseThawed(host, stores);
  await gcMemBases(host.paths, stores);
}

/** Every directory of records whose files may use a base: a restore's files in either place
 * hold theirs until it is settled. */
const holders = (host: QemuHost) =>
  (["instances", "snapshots", "restoring", "replaced"] as const).map((k) => ({
    layout: host.views[k].paths,
    store: host.views[k].store,
  }));

/** A process's private pages (Private_Clean + Private_Dirty), bytes; undefined once it is gone. */
export function privateBytes(pid: number): number | undefined {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/smaps_rollup`, "utf8");
  } catch {
    return undefined;
  }
  let kb = 0;
  for (const m of text.matchAll(/^Private_(?:Clean|Dirty):\s+(\d+) kB/gm)) kb += Number(m[1]);
  return kb * 1024;
}

/** The kernel's estimate of memory available for new work (MemAvailable), bytes. */
export function memAvailableBytes(): number {
  const m = /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync("/proc/meminfo", "utf8"));
  return Number(m?.[1] ?? 0) * 1024;
}
