// Builds the QEMU command line for one guest and starts it, detached, so the guest outlives the
// agent (a restarted agent finds it again by its QMP socket).
//
// The machine is `-machine microvm` booting the ELF vmlinux through its PVH entry (no firmware
// path through real-mode setup: fastest boot measured, 3–4 s to /init under TCG). Guest RAM is a
// memory-backend-file so that forks can later map a frozen copy of it (see FACTS.md).
import { closeSync, openSync, readFileSync } from "node:fs";
import { execa } from "execa";
import { AGENT_PORT } from "../../../guest/agent-protocol.ts";
import {
  CMDLINE_COMMAND,
  CONTROL_PORT,
  GUEST_DISKS,
  VOLUME_DISK_PREFIX,
} from "../../../guest/protocol.ts";
import { checkSocketPath, QmpClient } from "./qmp.ts";

export type Accel = "kvm" | "tcg";

export interface GuestSpec {
  /** qemu-system-x86_64 */
  qemu: string;
  /** ELF vmlinux with a PVH entry (microvm loads it directly). */
  kernel: string;
  initramfs: string;
  accel: Accel;
  memoryMiB: number;
  vcpus: number;
  /** File that holds guest RAM; QEMU creates it (sparse) if missing. */
  memFile: string;
  /** MAP_SHARED (default): the file is the live guest memory. false: copy-on-write over it. */
  shareMemory?: boolean;
  /** Unix socket QEMU listens on for QMP; < 108 bytes. */
  qmpSocket: string;
  /** Unix socket QEMU listens on for the guest control channel: a virtio-serial port named
   * `offshoot.ctl` that /init answers on (control.ts); < 108 bytes. Every guest has it, so a
   * snapshot's device layout always matches its restore's. */
  ctlSocket: string;
  /** Unix socket for the guest agent's port (`offshoot.agent`, host-agent/guest/agent-protocol.ts);
   * absent: no such port (a record from before it, whose snapshots lack the device). */
  agentSocket?: string;
  /** Guest serial console (ttyS0), written by QEMU. */
  serialLog: string;
  /** QEMU's own stdout/stderr. */
  qemuLog: string;
  /** Append to the serial log instead of truncating it (a restored guest continues its log). */
  appendSerial?: boolean;
  /** Shell command /init runs (`sh -c`); omitted → a counter printing once a second. */
  command?: string;
  /** Appended to the kernel command line, e.g. "quiet" or "virtio_mmio.device=…". */
  kernelArgs?: readonly string[];
  /** Appended to QEMU's arguments (devices, netdevs, `-incoming defer`). */
  extraArgs?: readonly string[];
  /** Runs QEMU under this command, e.g. HostNetwork.execPrefix (nsenter into the network
   * namespace holding the guest's TAP); it must exec QEMU so that the pid is QEMU's. */
  execPrefix?: readonly string[];
}

/** x86 COMMAND_LINE_SIZE. */
const MAX_CMDLINE = 2048;

/** QEMU option values escape a comma by doubling it. */
const optValue = (v: string) => v.replaceAll(",", ",,");

export function kernelCmdline(spec: Pick<GuestSpec, "command" | "kernelArgs">): string {
  const args = [
    "console=ttyS0",
    // microvm under TCG hangs calibrating the TSC without it (FACTS.md); harmless under KVM.
    "tsc_early_khz=2000000",
    // A dying /init panics; reboot at once so that -no-reboot ends QEMU instead of it hanging.
    "panic=-1",
    ...(spec.kernelArgs ?? []),
  ];
  // Base64 keeps the command one token: /init splits /proc/cmdline on whitespace.
  if (spec.command !== undefined)
    args.push(`${CMDLINE_COMMAND}=${Buffer.from(spec.command).toString("base64")}`);
  const line = args.join(" ");
  if (line.length >= MAX_CMDLINE) {
    throw new Error(`kernel command line is ${line.length} bytes; the limit is ${MAX_CMDLINE - 1}`);
  }
  return line;
}

export function qemuArgs(spec: GuestSpec): string[] {
  const mem = `${spec.memoryMiB}M`;
  const share = spec.shareMemory ?? true;
  return [
    "-name",
    "offshoot",
    // ACPI stays on (the default): the cloud kernel finds virtio-mmio devices only through ACPI,
    // it lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES.
    "-machine",
    "microvm,memory-backend=mem",
    "-accel",
    spec.accel,
    ...(spec.accel === "kvm" ? ["-cpu", "host"] : []),
    "-smp",
    String(spec.vcpus),
    "-m",
    mem,
    "-object",
    `memory-backend-file,id=mem,size=${mem},mem-path=${optValue(spec.memFile)},share=${share ? "on" : "off"}`,
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    // Guest reboot (or panic) ends QEMU, like poweroff: the agent observes one "exited" path.
    "-no-reboot",
    "-kernel",
    spec.kernel,
    "-initrd",
    spec.initramfs,
    "-append",
    kernelCmdline(spec),
    "-chardev",
    `file,id=serial0,path=${optValue(spec.serialLog)}${spec.appendSerial ? ",append=on" : ""}`,
    "-serial",
    "chardev:serial0",
    "-qmp",
    `unix:${optValue(checkSocketPath(spec.qmpSocket))},server=on,wait=off`,
    // The control channel (no vsock on these hosts, FACTS.md): virtio-serial on virtio-mmio.
    "-device",
    "virtio-serial-device,id=vser0",
    "-chardev",
    `socket,id=ctl,path=${optValue(checkSocketPath(spec.ctlSocket))},server=on,wait=off`,
    "-device",
    `virtserialport,bus=vser0.0,chardev=ctl,name=${CONTROL_PORT}`,
    ...(spec.agentSocket
      ? [
          "-chardev",
          `socket,id=agent,path=${optValue(checkSocketPath(spec.agentSocket))},server=on,wait=off`,
          "-device",
          `virtserialport,bus=vser0.0,chardev=agent,name=${AGENT_PORT}`,
        ]
      : []),
    ...(spec.extraArgs ?? []),
  ];
}

/**
 * A guest's devices, in the order a device-state stream expects to load into: its three disks
 * — the image's rootfs, its own disk, its config disk — then its volumes' disks, in the order of
 * its spec, and its NIC when it has one (its MAC and the `-netdev` value behind it, nic.ts).
 * /init finds each disk by its serial, whatever order the kernel probes them in. `diskIoBps`
 * becomes QEMU's block throttling on the guest's reads and writes of all but the config disk.
 */
export function guestDevices(
  disks: { root: string; rw: string; cfg: string },
  nic: { mac: string; netdev: string } | null,
  diskIoBps: number | null = null,
  volumes: ReadonlyArray<{ file: string; readonly: boolean }> = [],
): string[] {
  const limit = diskIoBps ? `,throttling.bps-total=${diskIoBps}` : "";
  const drive = (id: string, serial: string, file: string, opts: string) => [
    "-drive",
    `file=${optValue(file)},if=none,id=${id},${opts}`,
    "-device",
    `virtio-blk-device,drive=${id},serial=${serial}`,
  ];
  return [
    ...drive("root", GUEST_DISKS.root, disks.root, `format=raw,readonly=on${limit}`),
    ...drive("rw", GUEST_DISKS.rw, disks.rw, `format=qcow2${limit}`),
    ...drive("cfg", GUEST_DISKS.cfg, disks.cfg, "format=raw,readonly=on"),
    ...volumes.flatMap((v, i) =>
      drive(
        `vol${i}`,
        `${VOLUME_DISK_PREFIX}${i}`,
        v.file,
        `format=raw,readonly=${v.readonly ? "on" : "off"}${limit}`,
      ),
    ),
    ...(nic === null
      ? []
      : ["-netdev", nic.netdev, "-device", `virtio-net-device,netdev=net0,id=nic0,mac=${nic.mac}`]),
  ];
}

export interface QemuExit {
  exitCode: number | undefined;
  signal: string | undefined;
}

export interface LaunchedQemu {
  pid: number;
  qmpSocket: string;
  serialLog: string;
  qemuLog: string;
  args: string[];
  /** Connected and past capabilities negotiation. */
  qmp: QmpClient;
  /** Resolves when this QEMU process ends (only while this agent process is its parent). */
  exited: Promise<QemuExit>;
}

export interface LaunchOptions {
  /** How long QEMU may take to open its QMP socket. */
  qmpTimeoutMs?: number;
}

/** Starts QEMU detached and connects QMP. On failure the process is killed and the error carries
 * QEMU's own output (bad arguments, missing /dev/kvm, …). */
export async function launchQemu(spec: GuestSpec, opts: LaunchOptions = {}): Promise<LaunchedQemu> {
  const args = qemuArgs(spec);
  // A file descriptor, not a pipe: QEMU must keep a valid stdout/stderr after the agent exits.
  // execa's types admit only the literals 3–9, any open fd works at runtime.
  const out = openSync(spec.qemuLog, "a") as 3;
  const sub = (() => {
    try {
      const [file, ...prefixArgs] = [...(spec.execPrefix ?? []), spec.qemu];
      return execa(file as string, [...prefixArgs, ...args], {
        detached: true,
        cleanup: false,
        reject: false,
        stdin: "ignore",
        stdout: out,
        stderr: out,
      });
    } finally {
      closeSync(out);
    }
  })();
  const exited: Promise<QemuExit> = sub.then((r) => ({
    exitCode: r.exitCode,
    signal: r.signal,
  }));
  sub.unref();
  const pid = sub.pid;
  if (pid === undefined) {
    const r = await holdingOpen(exited);
    throw new Error(`${spec.qemu} did not start (${r.exitCode ?? r.signal}): ${qemuOutput(spec)}`);
  }
  const gone = new AbortController();
  void exited.then(() => gone.abort(new Error("QEMU exited")));
  try {
    const qmp = await QmpClient.connect(spec.qmpSocket, {
      timeoutMs: opts.qmpTimeoutMs ?? 10_000,
      signal: gone.signal,
    });
    return {
      pid,
      qmpSocket: spec.qmpSocket,
      serialLog: spec.serialLog,
      qemuLog: spec.qemuLog,
      args,
      qmp,
      exited,
    };
  } catch (e) {
    killProcess(pid);
    const r = await holdingOpen(exited);
    throw new Error(
      `QEMU (pid ${pid}) failed to start (${r.exitCode ?? r.signal}): ${(e as Error).message}; ` +
        `QEMU said: ${qemuOutput(spec)}`,
      { cause: e },
    );
  }
}

function qemuOutput(spec: GuestSpec): string {
  try {
    return readFileSync(spec.qemuLog, "utf8").trim().slice(-2000) || "(nothing)";
  } catch (e) {
    return `(cannot read ${spec.qemuLog}: ${(e as Error).message})`;
  }
}

/**
 * Awaits `p` with the event loop held open. A QEMU child is unref'd (guests outlive the agent),
 * so a process with nothing else pending — an agent probing KVM at start, before its socket is
 * open — would otherwise end, with exit code 0, while waiting for that child's exit: measured,
 * 1 start in 20 on a host whose KVM test boot aborts at once.
 */
export async function holdingOpen<T>(p: Promise<T>): Promise<T> {
  const hold = setInterval(() => {}, 60_000);
  try {
    return await p;
  } finally {
    clearInterval(hold);
  }
}

/** SIGKILL, tolerating a process that is already gone. */
export function killProcess(pid: number): void {
  try {
    process.kill(pid, "SIGKILL");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ESRCH") throw e;
  }
}

/** Whether a process with this pid exists (it may be a zombie until its parent reaps it). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}
