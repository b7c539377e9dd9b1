// How a guest's end is seen and told: /init's exit marker on the serial console, or its QEMU
// gone; Hypeman's wording for the exit status. The driver polls Running guests with reconcile().
import { readFile } from "node:fs/promises";
import { constants as osConstants } from "node:os";
import { isMissing } from "../record-store.ts";
import { isOurQemu } from "./discovery.ts";
import { now, type QemuHost } from "./host.ts";
import { closeQmp, dropMemory, QUIT_TIMEOUT_MS, waitGone } from "./processes.ts";
import { initEvents } from "./serial.ts";
import type { QemuRecord } from "./store.ts";

/** Hypeman's wording for a program's exit status. */
export function exitMessage(code: number, oom = false): string {
  if (code === 127) return "command not found";
  if (code > 128 && code < 128 + 65) {
    const sig = code - 128;
    const name = Object.entries(osConstants.signals).find(([, n]) => n === sig)?.[0];
    return `killed by signal ${sig}${name ? ` (${name})` : ""}${oom ? " - OOM" : ""}`;
  }
  return `exited with code ${code}`;
}

export function exitEvent(log: string): { code: number; oom: boolean } | undefined {
  for (const e of initEvents(log)) {
    if (e.event === "exit") return { code: e.code, oom: e.oom === true };
  }
  return undefined;
}

/** The record of a guest whose QEMU is gone: Stopped, its memory dropped with it (so no memory
 * base is kept for it either). */
export function stopped(
  rec: QemuRecord,
  exit: { code: number | null; message: string | null },
): QemuRecord {
  return {
    ...rec,
    pid: null,
    ram: "file",
    ram_base: null,
    observed: {
      ...rec.observed,
      state: "Stopped",
      has_snapshot: false,
      stopped_at: now(),
      exit_code: exit.code,
      exit_message: exit.message,
    },
  };
}

/** Checks a Running record against its process and serial log; records and emits an exit. */
export async function reconcile(host: QemuHost, rec: QemuRecord): Promise<QemuRecord> {
  if (rec.observed.state !== "Running") return rec;
  const id = rec.observed.id;
  if (rec.pid === null) {
    return {
      ...rec,
      observed: { ...rec.observed, state: "Unknown", state_error: "Running without a pid" },
    };
  }
  const alive = isOurQemu(rec.pid, host.paths.qmpSocket(id));
  const exit = exitEvent(await serialSince(host, id, rec.serial_offset));
  if (alive && exit === undefined) return rec;
  // The guest has exited (its init powers off after the marker) or QEMU died under it.
  if (alive) {
    await waitGone(host, id, rec.pid, QUIT_TIMEOUT_MS);
  }
  await closeQmp(host, id);
  await dropMemory(host, id);
  const out = stopped(rec, {
    code: exit?.code ?? null,
    message:
      exit === undefined
        ? `hypervisor exited unexpectedly: ${await qemuLogTail(host, id)}`
        : exitMessage(exit.code, exit.oom),
  });
  await host.store.write(out);
  host.emit(out.observed);
  return out;
}

/** The guest's console output since `offset` (the log is appended across boots). */
export async function serialSince(host: QemuHost, id: string, offset: number): Promise<string> {
  try {
    const buf = await readFile(host.paths.serialLog(id));
    return buf.subarray(offset).toString("utf8");
  } catch (e) {
    if (isMissing(e)) return "";
    throw e;
  }
}

/** QEMU's last words, for an error message. */
export async function qemuLogTail(host: QemuHost, id: string): Promise<string> {
  try {
    const text = (await readFile(host.paths.qemuLog(id), "utf8")).trim();
    return text.split("\n").slice(-3).join(" | ") || "(no output)";
  } catch {
    return "(no output)";
  }
}
