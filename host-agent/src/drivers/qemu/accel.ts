// KVM or TCG. `/dev/kvm` existing is not enough: on these dev machines the host KVM is PVM, where
// a stock kernel hangs or dies with emulation failures (FACTS.md). So `auto` boots the configured
// kernel under KVM once, bounded, and uses KVM only if /init's ready marker appears in time.
import { accessSync, constants, existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import path from "node:path";
import { type Accel, holdingOpen, killProcess, launchQemu } from "./launch.ts";
import { initEvents, waitForSerial } from "./serial.ts";

export type AccelMode = "auto" | "kvm" | "tcg";

export interface AccelDecision {
  accel: Accel;
  mode: AccelMode;
  /** Why, for the agent's start-up log. */
  reason: string;
  /** Time the decision took, including a test boot. */
  ms: number;
}

export interface AccelOptions {
  /** What the test boot runs. */
  assets: { qemu: string; kernelElf: string; initramfs: string };
  /** Where the test boot's files go (a fresh subdirectory, removed afterwards; the directory is
   * created if missing). Keep it short: the QMP socket lives there. */
  workDir: string;
  /** Test boot budget. A real KVM host reaches /init in well under a second. */
  timeoutMs?: number;
  kvmDevice?: string;
}

const cache = new Map<string, Promise<AccelDecision>>();

/** Decides once per (mode, kernel, initramfs, device) in this process; later calls share it.
 * Never rejects: whatever goes wrong while probing KVM means TCG, with the reason. */
export function resolveAccel(mode: AccelMode, opts: AccelOptions): Promise<AccelDecision> {
  const device = opts.kvmDevice ?? "/dev/kvm";
  const key = JSON.stringify([
    mode,
    opts.assets.qemu,
    opts.assets.kernelElf,
    opts.assets.initramfs,
    device,
  ]);
  let decision = cache.get(key);
  if (!decision) {
    decision = decide(mode, { ...opts, kvmDevice: device });
    cache.set(key, decision);
  }
  return decision;
}

export function clearAccelCache(): void {
  cache.clear();
}

async function decide(
  mode: AccelMode,
  opts: AccelOptions & { kvmDevice: string },
): Promise<AccelDecision> {
  const started = Date.now();
  const done = (accel: Accel, reason: string): AccelDecision => ({
    accel,
    mode,
    reason,
    ms: Date.now() - started,
  });
  if (mode === "tcg") return done("tcg", "configured");
  if (mode === "kvm") return done("kvm", "configured");
  if (!existsSync(opts.kvmDevice)) return done("tcg", `${opts.kvmDevice} does not exist`);
  try {
    accessSync(opts.kvmDevice, constants.R_OK | constants.W_OK);
  } catch (e) {
    return done("tcg", `${opts.kvmDevice} is not usable: ${(e as Error).message}`);
  }
  const probe = await kvmTestBoot(opts).catch(
    (e: unknown): Probe => ({ ok: false, why: (e as Error).message ?? String(e) }),
  );
  return probe.ok
    ? done("kvm", `test boot under KVM reached /init in ${probe.ms} ms`)
    : done("tcg", `test boot under KVM failed: ${probe.why}`);
}

type Probe = { ok: true; ms: number } | { ok: false; why: string };

async function kvmTestBoot(opts: AccelOptions): Promise<Probe> {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const started = Date.now();
  let dir: string | undefined;
  let vm: Awaited<ReturnType<typeof launchQemu>> | undefined;
  try {
    mkdirSync(opts.workDir, { recursive: true });
    dir = mkdtempSync(path.join(opts.workDir, "kvm-probe-"));
    vm = await launchQemu(
      {
        qemu: opts.assets.qemu,
        kernel: opts.assets.kernelElf,
        initramfs: opts.assets.initramfs,
        accel: "kvm",
        memoryMiB: 128,
        vcpus: 1,
        memFile: path.join(dir, "mem"),
        qmpSocket: path.join(dir, "qmp.sock"),
        ctlSocket: path.join(dir, "ctl.sock"),
        serialLog: path.join(dir, "serial.log"),
        qemuLog: path.join(dir, "qemu.log"),
        command: "exit 0",
      },
      { qmpTimeoutMs: timeoutMs },
    );
    await vm.qmp.close();
    const gone = new AbortController();
    const exited = vm.exited;
    void exited.then(() => gone.abort(new Error("QEMU exited before /init was ready")));
    await waitForSerial(
      vm.serialLog,
      (log) => (initEvents(log).some((e) => e.event === "ready") ? true : undefined),
      { timeoutMs: Math.max(timeoutMs - (Date.now() - started), 0), signal: gone.signal },
    );
    return { ok: true, ms: Date.now() - started };
  } catch (e) {
    return { ok: false, why: (e as Error).message.split("\n")[0] ?? String(e) };
  } finally {
    if (vm) {
      killProcess(vm.pid);
      await holdingOpen(vm.exited);
    }
    if (dir) rmSync(dir, { recursive: true, force: true });
  }
}
