// For tests and benchmarks that boot real QEMU guests: short temp dirs (the QMP socket
// must fit in sun_path), a cleanup that leaves no process or directory behind, the instance spec
// of a small test guest, and waiting on what its serial console shows.
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import type { InstanceSpec } from "@offshoot/shared";
import { TEST_IMAGE } from "../../scripts/oci-image.ts";
import type { VmAssets } from "../../scripts/vm-assets.ts";
import {
  type GuestSpec,
  killProcess,
  type LaunchedQemu,
  processAlive,
} from "../src/drivers/qemu/launch.ts";
import { counts } from "../src/drivers/qemu/serial.ts";
import type { AgentPaths } from "../src/paths.ts";
import { spec } from "./index.ts";

/** A 256 MiB, 1 vCPU guest of the busybox test image, with a NIC (`mac`, else derived) and, when
 * given, an address in a subnet (a TAP on the driver's host network; else a NIC that reaches
 * nothing). */
export function testGuestSpec(
  id: string,
  over: Partial<InstanceSpec> = {},
  mac: string | null = null,
  address: { ip: string; subnet: string } | null = null,
): InstanceSpec {
  return spec(id, {
    name: id,
    image: TEST_IMAGE,
    hypervisor: "qemu",
    overlay_bytes: 64 * 1024 * 1024,
    network: {
      enabled: true,
      mac,
      ip: address?.ip ?? null,
      subnet: address?.subnet ?? null,
      bandwidth_download_bps: null,
      bandwidth_upload_bps: null,
    },
    ...over,
  });
}

/** The `OFFSHOOT-COUNT n` values in an instance's serial log so far ([] before it exists). */
export function serialCounts(paths: AgentPaths, id: string): number[] {
  try {
    return counts(readFileSync(paths.qemu.serialLog(id), "utf8"));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw e;
  }
}

export interface GuestDir {
  dir: string;
  spec(overrides?: Partial<GuestSpec>): GuestSpec;
}

type GuestFiles = Pick<GuestSpec, "memFile" | "qmpSocket" | "ctlSocket" | "serialLog" | "qemuLog">;

/** The test machine (TCG, 256 MiB, one vCPU, the built assets) with its files where given. */
export function testMachine(
  assets: VmAssets,
  files: GuestFiles,
  overrides: Partial<GuestSpec> = {},
): GuestSpec {
  return {
    qemu: assets.qemu,
    kernel: assets.kernelElf,
    initramfs: assets.initramfs,
    accel: "tcg",
    memoryMiB: 256,
    vcpus: 1,
    ...files,
    ...overrides,
  };
}

export function guestDir(assets: VmAssets): GuestDir {
  const dir = mkdtempSync(path.join(os.tmpdir(), "oq-"));
  const files: GuestFiles = {
    memFile: path.join(dir, "mem"),
    qmpSocket: path.join(dir, "qmp.sock"),
    ctlSocket: path.join(dir, "ctl.sock"),
    serialLog: path.join(dir, "serial.log"),
    qemuLog: path.join(dir, "qemu.log"),
  };
  return { dir, spec: (overrides = {}) => testMachine(assets, files, overrides) };
}

/** Kills what is still running and removes the directories. */
export async function cleanupGuests(vms: LaunchedQemu[], dirs: GuestDir[]): Promise<void> {
  for (const vm of vms.splice(0)) {
    await vm.qmp.close();
    killProcess(vm.pid);
    await vm.exited;
  }
  for (const d of dirs.splice(0)) rmSync(d.dir, { recursive: true, force: true });
}

/** VmRSS of a process in KiB, from /proc; undefined once the process is gone. */
export function rssKiB(pid: number): number | undefined {
  let status: string;
  try {
    status = readFileSync(`/proc/${pid}/status`, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw e;
  }
  const m = /^VmRSS:\s+(\d+) kB/m.exec(status);
  return m?.[1] ? Number(m[1]) : undefined;
}

/** The QEMU processes whose command line names a path under `dir`. */
export function guestPidsUnder(dir: string): number[] {
  const pids: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    let cmdline: string;
    try {
      cmdline = readFileSync(`/proc/${name}/cmdline`, "utf8");
    } catch {
      continue; // gone meanwhile
    }
    const args = cmdline.split("\0");
    if (args[0]?.includes("qemu-system") && args.some((a) => a.includes(dir))) {
      pids.push(Number(name));
    }
  }
  return pids;
}

/** The summed proportional set size of `pids` (shared pages divided among their mappers):
 * what they cost the host together. */
export function pssOf(pids: readonly number[]): number {
  let bytes = 0;
  for (const pid of pids) {
    try {
      const m = /^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"));
      bytes += Number(m?.[1] ?? 0) * 1024;
    } catch {
      // gone meanwhile
    }
  }
  return bytes;
}

/** CPU seconds `pids` have used (user + system). */
export function cpuSecondsOf(pids: readonly number[]): number {
  let ticks = 0;
  for (const pid of pids) {
    try {
      const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]?.split(" ") ?? [];
      ticks += Number(f[11] ?? 0) + Number(f[12] ?? 0);
    } catch {
      // gone meanwhile
    }
  }
  return ticks / 100;
}

/** This machine's MemAvailable, bytes (what the QEMU driver reports). */
export { memAvailableBytes as memAvailable } from "../src/drivers/qemu/processes.ts";

/** A test guest's program that fills 40 % of 256 MiB (a 100 MiB file of random bytes in its page
 * cache), says so, then idles (a sleep an hour long, again and again). */
export const FILL_PROGRAM =
  "head -c 104857600 /dev/urandom > /root/fill && sync && echo OFFSHOOT-FILLED && while :; do sleep 3600; done";

/** SIGKILLs every QEMU whose command line names a path under `dir` (a test's or benchmark's own
 * temp dir, so only guests it started): what a failed run left behind. Returns their pids. */
export async function killGuestsUnder(dir: string): Promise<number[]> {
  const killed: number[] = [];
  for (const pid of guestPidsUnder(dir)) {
    killProcess(pid);
    killed.push(pid);
  }
  // Their files stay open until they are gone (an unmount would find the filesystem busy).
  const deadline = Date.now() + 5_000;
  while (killed.some((pid) => processAlive(pid) && !isZombie(pid)) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
  }
  return killed;
}

function isZombie(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
  } catch {
    return true;
  }
}

/** Aborts when QEMU exits, so waits on the serial log fail fast instead of timing out. */
export function exitSignal(vm: LaunchedQemu): AbortSignal {
  const ac = new AbortController();
  void vm.exited.then((r) => ac.abort(new Error(`QEMU exited early: ${JSON.stringify(r)}`)));
  return ac.signal;
}
