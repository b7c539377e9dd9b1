// Standby and restore. Standby pauses the guest and saves only its device state with `migrate` +
// x-ignore-shared — the RAM is already in its memory-backend-file (FACTS.md: QEMU 7.2 has no
// `file:` URI, so `exec:cat > FILE`) — then quits QEMU. Restore maps the same RAM file, loads
// the device state with `-incoming defer`, continues, and makes sure the guest holds its own
// identity (a fork's first restore runs on its source's memory).
import { randomBytes } from "node:crypto";
import { rename, rm, writeFile } from "node:fs/promises";
import { setTimeout as sleep } from "node:timers/promises";
import { ApiError, InvalidStateError, type ObservedInstance } from "@offshoot/shared";
import { runSteps } from "../../operations/steps.ts";
import type { OpContext } from "../driver.ts";
import { running } from "../observed.ts";
import { exists } from "../record-store.ts";
import { guestSpec } from "./boot.ts";
import { setGuestIdentity } from "./control.ts";
import { copyMemory } from "./disks.ts";
import { stopped } from "./exit.ts";
import { holdsIdentity, identityFor, identityOf, shellQuote } from "./guest-config.ts";
import { load, now, type QemuHost } from "./host.ts";
import { launchQemu } from "./launch.ts";
import { prepareNic } from "./nic.ts";
import { dropMemory, gcMemory, kill, qmpFor, quit } from "./processes.ts";
import type { QmpClient } from "./qmp.ts";
import type { QemuRecord } from "./store.ts";

const MiB = 1024 * 1024;
const MIGRATE_TIMEOUT_MS = 60_000;
/** The identity command's bound: the guest answers in milliseconds when it gets CPU, but a host
 * running dozens of guests under TCG (a fan-out of forks) was measured at over 5 s. */
const CONTROL_TIMEOUT_MS = 30_000;
/** 7.2's default of 32 MiB/s would throttle the device-state stream for nothing. */
const MAX_BANDWIDTH = 10 * 1024 * MiB;

export async function standby(
  host: QemuHost,
  id: string,
  ctx: OpContext,
): Promise<ObservedInstance> {
  const rec = await load(host, id);
  if (rec.observed.state !== "Running" || rec.pid === null) {
    throw new InvalidStateError(`cannot standby instance ${id} in state ${rec.observed.state}`);
  }
  const out = await snapshot(host, rec, ctx.steps.record.bind(ctx.steps));
  return out.observed;
}

export async function restore(
  host: QemuHost,
  id: string,
  ctx: OpContext,
): Promise<ObservedInstance> {
  const rec = await load(host, id);
  if (rec.observed.state !== "Standby" || !(await hasSnapshot(host, rec))) {
    throw new InvalidStateError(`instance ${id} has no snapshot to restore`);
  }
  let out = rec;
  await runSteps(ctx.steps, [
    {
      name: "restore",
      run: async () => {
        out = await resume(host, rec);
      },
    },
  ]);
  return out.observed;
}

/** Running → Standby: pause, write the device state (RAM stays in its file), quit. */
export async function snapshot(
  host: QemuHost,
  rec: QemuRecord,
  record: (step: string) => Promise<void>,
): Promise<QemuRecord> {
  const id = rec.observed.id;
  const pid = rec.pid;
  if (pid === null) throw new InvalidStateError(`instance ${id} has no QEMU process`);
  const qmp = await qmpFor(host, id);
  const devState = host.paths.devStateFile(id);
  const partial = `${devState}.partial`;
  await runSteps({ record }, [
    {
      name: "pause",
      run: async () => {
        await qmp.execute("stop");
      },
      undo: async () => {
        await qmp.execute("cont");
      },
    },
    {
      name: "save-state",
      run: async () => {
        // Shared RAM is already in its file: only device state goes into the stream. RAM mapped
        // privately over a memory base exists nowhere else, so it goes into the stream too.
        await qmp.execute("migrate-set-capabilities", {
          capabilities: [{ capability: "x-ignore-shared", state: rec.ram !== "base" }],
        });
        await qmp.execute("migrate-set-parameters", { "max-bandwidth": MAX_BANDWIDTH });
        await qmp.execute("migrate", { uri: `exec:cat > ${shellQuote(partial)}` });
        await waitMigration(qmp, "completed");
        await rename(partial, devState);
      },
      undo: () => rm(devState, { force: true }),
    },
  ]);
  // Past this point the snapshot is complete; quitting cannot be undone, only finished.
  await quit(host, id, pid);
  const out: QemuRecord = {
    ...rec,
    pid: null,
    ram: rec.ram === "base" ? "stream" : rec.ram,
    ram_base: null,
    observed: { ...rec.observed, state: "Standby", has_snapshot: true },
  };
  await host.store.write(out);
  if (rec.ram_base !== null) await gcMemory(host);
  await record("release-vmm");
  return out;
}

/** Standby → Running: map the same RAM file, load the device state, continue. The guest
 * resumes where it was paused; the snapshot is consumed (has_snapshot false once Running).
 * Waits for a launch slot first (host.launches). */
export function resume(host: QemuHost, rec: QemuRecord): Promise<QemuRecord> {
  return host.launches.run(() => resumeNow(host, rec));
}

async function resumeNow(host: QemuHost, rec: QemuRecord): Promise<QemuRecord> {
  const id = rec.observed.id;
  const devState = host.paths.devStateFile(id);
  const memFile = host.paths.memFile(id);
  // The record as it will be once this QEMU runs: a forked source gets a writable copy of its
  // frozen RAM, RAM in the stream loads into a fresh file; either way the guest owns a file.
  const live = afterRestore(rec);
  if (rec.ram === "stream") await rm(memFile, { force: true });
  if (rec.ram === "frozen" && rec.ram_base !== null) {
    host.last.copyPath = await copyMemory(rec.ram_base, memFile);
  }
  await prepareNic(host, live);
  const vm = await launchQemu(
    // -S: nothing runs before `cont`, so a failed restore leaves the RAM file untouched.
    guestSpec(host, live, ["-S", "-incoming", "defer"]),
  ).catch(async (e: unknown) => {
    if (rec.ram === "frozen") await rm(memFile, { force: true });
    throw e;
  });
  host.qmps.set(id, vm.qmp);
  await writeFile(host.paths.pidFile(id), `${vm.pid}\n`);
  try {
    await vm.qmp.execute("migrate-set-capabilities", {
      capabilities: [{ capability: "x-ignore-shared", state: rec.ram !== "stream" }],
    });
    await vm.qmp.execute("migrate-incoming", { uri: `exec:cat ${shellQuote(devState)}` });
    await waitStatus(vm.qmp, "paused");
    await vm.qmp.execute("cont");
  } catch (e) {
    await kill(host, id, vm.pid);
    throw e;
  }
  // The restored guest still has the identity it was snapshotted with (the device state and
  // its kernel's memory carry the MAC; QEMU's command line does not change them): apply the
  // record's inside the guest before reporting Running. A fork must never run as its source.
  let identity: string;
  try {
    identity = await applyIdentity(host, rec);
  } catch (e) {
    // The guest has run since `cont`, so its RAM file no longer matches the old device state:
    // snapshot it again to get back to a consistent Standby (a fork's undo then discards it).
    await resnapshot(host, { ...live, pid: vm.pid }).catch(async () => {
      await kill(host, id, vm.pid);
      await dropMemory(host, id);
      await host.store.write(
        stopped(rec, {
          code: rec.observed.exit_code ?? null,
          message: "guest identity not applied after restore",
        }),
      );
    });
    throw new ApiError(
      "internal_error",
      `instance ${id}: restored guest did not apply its identity: ${(e as Error).message}`,
    );
  }
  await rm(devState, { force: true });
  const out: QemuRecord = {
    ...live,
    pid: vm.pid,
    guest_identity: identity,
    observed: running(id, rec.observed.started_at ?? now()),
  };
  await host.store.write(out);
  if (rec.ram === "frozen") await gcMemory(host);
  return out;
}

/**
 * Tells the guest who it is over the control channel — hostname, the NIC's MAC, its address and
 * default route (its neighbours flushed, a gratuitous ARP sent), its machine id — and reseeds its
 * kernel RNG with 32 fresh bytes, unless its memory already holds exactly that identity (a plain
 * restore). A fork's first restore always differs from its source, so no fork runs with its
 * source's address or random state. Returns the identity.
 */
export async function applyIdentity(host: QemuHost, rec: QemuRecord): Promise<string> {
  const want = identityOf(rec);
  if (holdsIdentity(rec)) {
    host.last.identityMs = 0;
    return want;
  }
  const started = Date.now();
  await setGuestIdentity(host.paths.ctlSocket(rec.observed.id), identityFor(rec), randomBytes(32), {
    timeoutMs: host.options.controlTimeoutMs ?? CONTROL_TIMEOUT_MS,
  });
  host.last.identityMs = Date.now() - started;
  return want;
}

/** The record once a restored guest runs: it owns a RAM file (a forked source's copy of its
 * frozen RAM, or the RAM loaded from the stream), unless it is a fork mapping its memory base. */
export function afterRestore(rec: QemuRecord): QemuRecord {
  return rec.ram === "frozen" || rec.ram === "stream"
    ? { ...rec, ram: "file", ram_base: null }
    : rec;
}

/** Whether the record's snapshot files are all there. */
export async function hasSnapshot(host: QemuHost, rec: QemuRecord): Promise<boolean> {
  if (!(await exists(host.paths.devStateFile(rec.observed.id)))) return false;
  if (rec.ram === "stream") return true;
  if (rec.ram === "base" || rec.ram === "frozen") {
    return rec.ram_base !== null && exists(rec.ram_base);
  }
  return exists(host.paths.memFile(rec.observed.id));
}

/** Back to Standby after a restore that cannot go on (the guest has run since `cont`). */
async function resnapshot(host: QemuHost, rec: QemuRecord): Promise<void> {
  await snapshot(
    host,
    { ...rec, observed: running(rec.observed.id, rec.observed.started_at ?? now()) },
    async () => {},
  );
}

async function waitMigration(qmp: QmpClient, want: "completed"): Promise<void> {
  const deadline = Date.now() + MIGRATE_TIMEOUT_MS;
  for (;;) {
    const info = await qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate");
    if (info.status === want) return;
    if (info.status === "failed" || info.status === "cancelled") {
      throw new Error(`migration ${info.status}: ${info["error-desc"] ?? "no detail"}`);
    }
    if (Date.now() >= deadline) throw new Error(`migration not ${want} (${info.status})`);
    await sleep(10);
  }
}

async function waitStatus(qmp: QmpClient, want: string): Promise<void> {
  const deadline = Date.now() + MIGRATE_TIMEOUT_MS;
  for (;;) {
    const s = await qmp.execute<{ status: string }>("query-status");
    if (s.status === want) return;
    const m = await qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate");
    if (m.status === "failed") {
      throw new Error(`incoming migration failed: ${m["error-desc"] ?? "no detail"}`);
    }
    if (Date.now() >= deadline) throw new Error(`guest not ${want} (status ${s.status})`);
    await sleep(10);
  }
}
