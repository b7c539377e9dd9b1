// Finding an instance's QEMU in /proc. QEMU runs detached and outlives the agent; a restarted
// agent, or one checking a guest it launched, knows it by the QMP socket on its command line,
// never by a pid alone (pids are reused).
import { readdirSync, readFileSync } from "node:fs";
import { isMissing } from "../record-store.ts";

/** Alive, not a zombie, and QEMU with this instance's QMP socket (not a reused pid). */
export function isOurQemu(pid: number, qmpSocket: string): boolean {
  try {
    const stat = readProc(`/proc/${pid}/stat`);
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    if (state === "Z" || state === "X") return false;
    return readProc(`/proc/${pid}/cmdline`).includes(qmpSocket);
  } catch (e) {
    if (isMissing(e) || (e as NodeJS.ErrnoException).code === "ESRCH") return false;
    throw e;
  }
}

/**
 * Every live QEMU serving this instance, found by the QMP socket on its command line. launchQemu
 * spawns QEMU, connects QMP, and only then can the caller write the pid file; an agent killed in
 * between leaves a guest neither the record nor the pid file names, which recovery must still
 * find (to discard it, or to re-adopt it).
 */
export function qemuPidsFor(qmpSocket: string): number[] {
  const pids: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const pid = Number(name);
    try {
      if (pid !== process.pid && isOurQemu(pid, qmpSocket)) pids.push(pid);
    } catch {
      // A process we may not inspect is not one of our guests.
    }
  }
  return pids;
}

/** Synchronous on purpose: /proc reads do not block, and callers poll in tight loops. */
function readProc(file: string): string {
  return readFileSync(file, "utf8");
}
