// After an agent crash mid-operation: make an instance's record say what its QEMU process and
// files show. A QEMU launched before its pid was written is found by its QMP socket (/proc).
import { mkdir, readFile, rename, rm } from "node:fs/promises";
import { running } from "../observed.ts";
import { exists, isMissing } from "../record-store.ts";
import { isOurQemu, qemuPidsFor } from "./discovery.ts";
import { stopped } from "./exit.ts";
import { now, type QemuHost } from "./host.ts";
import { dropMemory, gcMemory, kill, qmpFor } from "./processes.ts";
import { afterRestore, applyIdentity, hasSnapshot } from "./snapshot.ts";
import type { QemuRecord } from "./store.ts";

/** Makes the record say what the process and files show (rollback's converge). */
export async function converge(host: QemuHost, id: string): Promise<void> {
  const read = await host.store.read(id);
  if (read.kind !== "ok") return;
  const rec = read.record;
  let pid = rec.pid;
  if (pid === null) {
    try {
      pid = Number.parseInt(await readFile(host.paths.pidFile(id), "utf8"), 10);
    } catch (e) {
      if (!isMissing(e)) throw e;
    }
  }
  const sock = host.paths.qmpSocket(id);
  // A guest launched by an agent killed before it recorded the pid: found by its socket.
  if (pid === null || !isOurQemu(pid, sock)) pid = qemuPidsFor(sock)[0] ?? null;
  if (pid !== null) {
    const qmp = await qmpFor(host, id);
    const { status } = await qmp.execute<{ status: string }>("query-status");
    if (status === "inmigrate") {
      // An interrupted restore that never loaded its device state: the guest has not run, so
      // the snapshot on disk is intact. Kept, this QEMU would be a Running guest that never runs.
      await kill(host, id, pid);
    } else {
      // An interrupted standby paused it, or an interrupted restore had not continued it yet.
      if (status === "paused" || status === "postmigrate") await qmp.execute("cont");
      await rm(host.paths.devStateFile(id), { force: true });
      // After a restore the guest owns a RAM file (resume()'s `live`), whatever the snapshot was.
      const live: QemuRecord = {
        ...afterRestore(rec),
        pid,
        observed: running(id, rec.observed.started_at ?? now()),
      };
      try {
        // A fork's first restore cut short may not have told the guest who it is yet.
        await host.store.write({ ...live, guest_identity: await applyIdentity(host, live) });
      } catch (e) {
        await kill(host, id, pid);
        await dropMemory(host, id);
        await host.store.write(
          stopped(live, {
            code: null,
            message: `guest identity not applied after an interrupted restore: ${(e as Error).message}`,
          }),
        );
      }
      await gcMemory(host);
      return;
    }
  }
  // A freeze-memory step cut short after its record was written: finish moving the file.
  if (
    rec.ram === "frozen" &&
    rec.ram_base !== null &&
    !(await exists(rec.ram_base)) &&
    (await exists(host.paths.memFile(id)))
  ) {
    await mkdir(host.paths.memBasesDir, { recursive: true });
    await rename(host.paths.memFile(id), rec.ram_base);
  }
  const snapshot = await hasSnapshot(host, rec);
  if (snapshot && (rec.observed.state === "Running" || rec.observed.state === "Standby")) {
    await host.store.write({
      ...rec,
      pid: null,
      observed: { ...rec.observed, state: "Standby", has_snapshot: true },
    });
    return;
  }
  if (rec.observed.state === "Running" || rec.observed.state === "Standby") {
    await dropMemory(host, id);
    await host.store.write(
      stopped(rec, {
        code: rec.observed.exit_code ?? null,
        message: "hypervisor gone after an interrupted operation",
      }),
    );
  }
}
