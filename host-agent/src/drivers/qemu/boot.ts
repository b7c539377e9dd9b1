// Cold boots: create (a new disk, then boot) and start (boot a Stopped instance again). A boot
// writes the config disk, launches QEMU on a fresh RAM file, and waits for /init's ready marker.
//
// A guest's disks: the image's rootfs (shared, read-only), the instance's own ext4 (a qcow2 on a
// shared blank template, then on frozen bases after forks) and a config disk /init reads at boot
// (guestConfig). /init mounts the first two as overlayfs and runs the program there.
import { rename, stat, writeFile } from "node:fs/promises";
import { setTimeout as sleep } from "node:timers/promises";
import {
  ApiError,
  type InstanceSpec,
  InvalidStateError,
  type ObservedInstance,
} from "@offshoot/shared";
import { INIT_MARKER } from "../../../guest/protocol.ts";
import { runSteps } from "../../operations/steps.ts";
import type { OpContext, OpData } from "../driver.ts";
import { running } from "../observed.ts";
import { isMissing } from "../record-store.ts";
import { isOurQemu } from "./discovery.ts";
import { createInstanceDisk } from "./disks.ts";
import { qemuLogTail, serialSince } from "./exit.ts";
import { attachedVolumes, guestConfig, identityOf, machineFor } from "./guest-config.ts";
import { load, now, type QemuHost } from "./host.ts";
import { type GuestSpec, guestDevices, launchQemu } from "./launch.ts";
import { netdevOf, prepareNic } from "./nic.ts";
import { discard, dropMemory, gcMemory, kill, makeInstanceDir } from "./processes.ts";
import { type InitEvent, initEvents } from "./serial.ts";
import type { QemuRecord } from "./store.ts";

export async function create(
  host: QemuHost,
  spec: InstanceSpec,
  ctx: OpContext,
): Promise<ObservedInstance> {
  const id = spec.id;
  const machine = machineFor(spec);
  const image = await host.options.images.forSpec(spec);
  guestConfig(spec, image); // refuses a spec with nothing to run before anything is made
  let rec: QemuRecord = {
    created_by: ctx.commandId,
    spec,
    image,
    machine,
    observed: { id, state: "Initializing", has_snapshot: false, state_error: null },
    pid: null,
    serial_offset: 0,
    ram: "file",
    ram_base: null,
    disk_base: null,
    compressed: null,
    guest_identity: null,
  };
  await runSteps(ctx.steps, [
    {
      name: "create-disk",
      run: async () => {
        await makeInstanceDir(host, id);
        await createInstanceDisk(
          host.tools,
          host.paths,
          host.paths.diskFile(id),
          spec.overlay_bytes,
        );
      },
      undo: () => discard(host, id),
    },
    { name: "register", run: () => host.store.write(rec) },
    {
      name: "boot",
      run: async () => {
        rec = await boot(host, rec);
      },
    },
  ]);
  return rec.observed;
}

export async function start(
  host: QemuHost,
  op: OpData<"start">,
  ctx: OpContext,
): Promise<ObservedInstance> {
  const id = op.instance_id;
  const before = await load(host, id);
  if (before.observed.state !== "Stopped") {
    throw new InvalidStateError(`cannot start instance ${id} in state ${before.observed.state}`);
  }
  const spec = {
    ...before.spec,
    entrypoint: op.entrypoint ?? before.spec.entrypoint,
    cmd: op.cmd ?? before.spec.cmd,
  };
  guestConfig(spec, before.image);
  let rec: QemuRecord = { ...before, spec };
  await runSteps(ctx.steps, [
    {
      name: "boot",
      run: async () => {
        rec = await boot(host, rec);
      },
    },
  ]);
  return rec.observed;
}

/** Cold boot with a fresh RAM file; resolves once /init's ready marker is on the serial. Waits
 * for a launch slot first (host.launches). */
export function boot(host: QemuHost, rec: QemuRecord): Promise<QemuRecord> {
  return host.launches.run(() => bootNow(host, rec));
}

async function bootNow(host: QemuHost, rec: QemuRecord): Promise<QemuRecord> {
  const id = rec.observed.id;
  await dropMemory(host, id);
  await writeConfig(host, rec);
  await prepareNic(host, rec);
  const hadBase = rec.ram_base !== null;
  rec = { ...rec, ram: "file", ram_base: null };
  const offset = await sizeOf(host.paths.serialLog(id));
  const vm = await launchQemu(guestSpec(host, rec));
  host.qmps.set(id, vm.qmp);
  await writeFile(host.paths.pidFile(id), `${vm.pid}\n`);
  // The pid goes on record before the wait, so a crash mid-boot can still find the process.
  await host.store.write({ ...rec, pid: vm.pid, serial_offset: offset });
  try {
    await waitForSerial(host, id, offset, vm.pid, (log) => {
      const events = initEvents(log);
      const failed = events.find(
        (e): e is Extract<InitEvent, { event: "failed" }> => e.event === "failed",
      );
      if (failed) throw new ApiError("internal_error", `guest init failed: ${failed.message}`);
      // An exit says the program ran, even when a kernel message on the console cut the ready
      // line short (an OOM kill right after the program starts prints many).
      return events.some((e) => e.event === "ready" || e.event === "exit");
    });
  } catch (e) {
    await kill(host, id, vm.pid);
    await dropMemory(host, id);
    await host.store.write(rec);
    throw e;
  }
  const out: QemuRecord = {
    ...rec,
    pid: vm.pid,
    serial_offset: offset,
    // /init set the hostname from the config disk; the NIC came up with the machine's MAC.
    guest_identity: identityOf(rec),
    observed: running(id, now()),
  };
  if (hadBase) await gcMemory(host);
  await host.store.write(out);
  return out;
}

export async function writeConfig(host: QemuHost, rec: QemuRecord): Promise<void> {
  const file = host.paths.configFile(rec.observed.id);
  await writeFile(`${file}.tmp`, guestConfig(rec.spec, rec.image));
  await rename(`${file}.tmp`, file);
}

/** The QEMU that runs this record: its machine, its disks, and its RAM where the record says. */
export function guestSpec(
  host: QemuHost,
  rec: QemuRecord,
  extra: readonly string[] = [],
): GuestSpec {
  const id = rec.observed.id;
  const m = rec.machine;
  const netdev = netdevOf(host, rec);
  const devices = guestDevices(
    { root: rec.image.rootfs, rw: host.paths.diskFile(id), cfg: host.paths.configFile(id) },
    m.mac === null || netdev === null ? null : { mac: m.mac, netdev },
    rec.spec.disk_io_bps,
    volumeDisks(host, rec),
  );
  return {
    qemu: host.options.assets.qemu,
    // Its TAP is in the host network's namespace: so is its QEMU.
    execPrefix: host.options.network?.execPrefix ?? [],
    kernel: host.options.assets.kernelElf,
    initramfs: host.options.assets.initramfs,
    accel: host.options.accel,
    memoryMiB: m.memory_mib,
    vcpus: m.vcpus,
    memFile: rec.ram === "base" && rec.ram_base !== null ? rec.ram_base : host.paths.memFile(id),
    shareMemory: rec.ram !== "base",
    qmpSocket: host.paths.qmpSocket(id),
    ctlSocket: host.paths.ctlSocket(id),
    ...(m.agent_port && { agentSocket: host.paths.agentSocket(id) }),
    serialLog: host.paths.serialLog(id),
    qemuLog: host.paths.qemuLog(id),
    appendSerial: true,
    extraArgs: [...devices, ...extra],
  };
}

async function waitForSerial(
  host: QemuHost,
  id: string,
  offset: number,
  pid: number,
  found: (log: string) => boolean,
): Promise<void> {
  const timeoutMs = host.options.bootTimeoutMs ?? 60_000;
  const deadline = Date.now() + timeoutMs;
  const sock = host.paths.qmpSocket(id);
  for (;;) {
    const log = await serialSince(host, id, offset);
    if (found(log)) return;
    if (!isOurQemu(pid, sock)) {
      // Read again: a guest whose program ends at once writes its marker and powers off
      // between the read above and the check.
      const last = await serialSince(host, id, offset);
      if (found(last)) return;
      const console = last.trim().split("\n").slice(-3).join(" | ");
      throw new ApiError(
        "boot_failed",
        `QEMU for ${id} exited during boot: ${await qemuLogTail(host, id)}${console ? `; the guest's console ended with: ${console}` : ""}`,
      );
    }
    if (Date.now() >= deadline) {
      const tail = log.trim().split("\n").slice(-3).join(" | ");
      // Any line that mentions a marker, readable or not, says how far the guest's init got.
      const marks = log
        .split("\n")
        .filter((l) => l.includes(INIT_MARKER))
        .slice(-3)
        .join(" | ");
      throw new ApiError(
        "timeout",
        `instance ${id} not ready within ${timeoutMs} ms: ${tail}${marks ? `; its init's lines: ${marks}` : ""}`,
      );
    }
    await sleep(100);
  }
}

async function sizeOf(file: string): Promise<number> {
  try {
    return (await stat(file)).size;
  } catch (e) {
    if (isMissing(e)) return 0;
    throw e;
  }
}

/** The files of an instance's volumes, as its spec lists them (an overlay volume is attached
 * read-only: its writes go to the instance's own disk). */
export function volumeDisks(
  host: QemuHost,
  rec: QemuRecord,
): Array<{ file: string; readonly: boolean }> {
  const volumes = attachedVolumes(rec.spec);
  if (volumes.length === 0) return [];
  const store = host.options.volumes;
  if (!store) throw new InvalidStateError("this host attaches no volumes");
  return volumes.map((v) => ({ file: store.file(v.key), readonly: !!(v.readonly || v.overlay) }));
}
