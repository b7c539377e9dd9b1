// Fork benchmarks with real QEMU guests (TCG): `npm run bench:vm` alone, or as part of
// `npm run bench` (`BENCH_ONLY=vm npm run bench` for this part only). Figures are reported, never
// asserted. All times are driver-level wall times (QemuDriver in this process; no control plane,
// no HTTP — the sim part of the bench measures that layer).
//
// (1) fork from Standby: driver.fork(target_state Running) until it resolves with the target
//     Running, i.e. its guest has applied its identity (hostname, MAC) over the control channel.
// (2) a plain QEMU restore of the same snapshot, launched by hand on a copy of its files:
//     launch with `-S -incoming defer`, x-ignore-shared, migrate-incoming `exec:cat`, paused,
//     `cont` (the driver's resume() without the driver).
// (3) the source's pause during a from_running fork, as the control plane runs it (standby → fork
//     made in Standby → restore the source → start the fork): from the start of standby until
//     the source's restore resolved.
// (4) (1) and (3) again with a naive fork done here, not by the driver: the RAM file copied with
//     `cp --reflink=never`, the disk flattened with `qemu-img convert` instead of an overlay,
//     then the same driver restores that copy (identity included).
// Each on two data dirs side by side: the default one (ext4 here: disks forked as overlays on a
// frozen base) and an XFS made with reflink=1 on a loop device (disks forked by reflink). The
// driver never copies RAM for a fork (the fork maps the source's frozen RAM file); a source
// restored after a fork takes a copy of it (a reflink on XFS).
import { execFileSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { copyFile, mkdir, rm, stat, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import type { InstanceSpec } from "@offshoot/shared";
import { execa } from "execa";
import type { OpContext } from "../host-agent/src/drivers/driver.ts";
import { guestControl } from "../host-agent/src/drivers/qemu/control.ts";
import { guestConfig, shellQuote } from "../host-agent/src/drivers/qemu/guest-config.ts";
import {
  type GuestSpec,
  guestDevices,
  killProcess,
  launchQemu,
} from "../host-agent/src/drivers/qemu/launch.ts";
import { QemuDriver } from "../host-agent/src/drivers/qemu/qemu-driver.ts";
import type { QmpClient } from "../host-agent/src/drivers/qemu/qmp.ts";
import { type QemuRecord, QemuStore } from "../host-agent/src/drivers/qemu/store.ts";
import { ImageStore } from "../host-agent/src/images/store.ts";
import { HostNetwork } from "../host-agent/src/network/index.ts";
import { type AgentPaths, agentPaths } from "../host-agent/src/paths.ts";
import { waitFor } from "../host-agent/testing/index.ts";
import { TestNamespaces } from "../host-agent/testing/netns.ts";
import { killGuestsUnder, serialCounts, testGuestSpec } from "../host-agent/testing/qemu.ts";
import { ensureTestImage } from "../scripts/oci-image.ts";
import { ensureVmAssets, type VmAssets } from "../scripts/vm-assets.ts";
import { mountXfsLoop, type XfsLoop } from "../scripts/xfs-loop.ts";
import { writeBenchPart } from "./results.ts";
import { percentile } from "./stats.ts";

const MiB = 1024 * 1024;
const PROBE = fileURLToPath(new URL("../host-agent/testing/net-probe.mjs", import.meta.url));
const QEMU_IMG = "/usr/bin/qemu-img";

export interface VmBenchOptions {
  /** How this run was started, recorded with the figures. */
  command: string;
  /** Repetitions per figure (BENCH_VM_REPS, default 5). */
  reps?: number;
  /** Guest sizes (default 256 MiB and 1 GiB). */
  sizesMiB?: readonly number[];
  /** Share of its RAM each guest writes before it idles (BENCH_VM_FILL, default 0.4), so that a
   * bigger guest also has more memory to fork; an idle guest touches ~100 MiB whatever its size. */
  fill?: number;
  log?: (line: string) => void;
}

type FsName = "ext4" | "xfs";
type Mode = "driver" | "naive";

interface DataDir {
  name: FsName;
  /** The data dir's guest network: its own namespace, bridge and TAPs (ids repeat across dirs). */
  net: BenchNet;
  /** The filesystem type as mounted (findmnt), for the report. */
  fstype: string;
  root: string;
  paths: AgentPaths;
  store: QemuStore;
  driver: QemuDriver;
  /** How the driver's forks cloned RAM and disk here. */
  copyPath?: string;
}

/** Samples by data dir, guest size and metric. */
class Samples {
  private readonly data = new Map<string, number[]>();
  add(fs: FsName, mib: number, metric: string, v: number): void {
    const k = `${fs}|${mib}|${metric}`;
    const list = this.data.get(k) ?? [];
    list.push(v);
    this.data.set(k, list);
  }
  get(fs: FsName, mib: number, metric: string): number[] {
    return this.data.get(`${fs}|${mib}|${metric}`) ?? [];
  }
  median(fs: FsName, mib: number, metric: string): number {
    return percentile(this.get(fs, mib, metric), 50);
  }
}

let commandSeq = 0;
/** An OpContext that timestamps each step the driver journals (a step is recorded when it ends). */
function timedCtx(): OpContext & { marks: Array<[string, number]> } {
  const marks: Array<[string, number]> = [];
  return {
    commandId: `bench-${++commandSeq}`,
    marks,
    steps: {
      record: async (step) => {
        marks.push([step, performance.now()]);
      },
    },
  };
}

/** The instance id whose TAP the hand-made restore uses. */
const HAND = "hand";
/** The guests' subnet in each data dir's namespace; its first address is the bridge. */
const SUBNET = "10.64.0.0/20";
/** The port every guest answers on (a responder its program starts before counting). */
const PORT = 7001;

interface BenchNet {
  ns: string;
  network: HostNetwork;
  /** A long-lived net-probe `waiter` inside the namespace: each "IP PORT" line written is
   * answered once a TCP connection to it brought data. */
  probe: ReturnType<TestNamespaces["spawn"]>;
  answers: string[];
  /** The next guest address's offset in SUBNET. */
  next: number;
}

/** Time until the guest at `ip` answers on PORT, from the host side of its bridge. */
async function waitAnswer(net: BenchNet, ip: string): Promise<void> {
  const seen = net.answers.length;
  net.probe.stdin?.write(`${ip} ${PORT}\n`);
  await waitFor(
    `${ip}:${PORT} to answer`,
    () => (net.answers.length > seen ? true : undefined),
    60_000,
    1,
  );
}

/** The test guest at `mib`, with the API's default overlay size and the next address. */
const spec = (
  d: DataDir,
  id: string,
  mib: number,
  mac: string,
  cmd: string[] | null = null,
): InstanceSpec => {
  const n = d.net.next++;
  const ip = `10.64.${n >> 8}.${n & 255}`;
  return testGuestSpec(id, { memory_bytes: mib * MiB, overlay_bytes: 10 * 1024 * MiB, cmd }, mac, {
    ip,
    subnet: SUBNET,
  });
};

const hex = (n: number) => (n & 0xff).toString(16).padStart(2, "0");

export async function runVmBench(opts: VmBenchOptions): Promise<string> {
  const log = opts.log ?? ((l: string) => console.log(`[bench:vm] ${l}`));
  const reps = opts.reps ?? 5;
  const sizes = opts.sizesMiB ?? [256, 1024];
  const fill = opts.fill ?? 0.4;
  const started = performance.now();
  const loadBefore = os.loadavg();
  const assets = await ensureVmAssets();
  const layout = ensureTestImage();
  const samples = new Samples();
  const ramBytes = new Map<string, number>();
  const dirs: DataDir[] = [];
  const ext4Root = mkdtempSync(path.join(os.tmpdir(), "obv-"));
  // Guests' TAPs and bridges go into namespaces made here, never the machine's own network.
  const spaces = new TestNamespaces();
  let xfs: XfsLoop | undefined;
  let cleaned = false;
  const cleanup = async () => {
    if (cleaned) return;
    cleaned = true;
    for (const d of dirs) await d.driver.close();
    await spaces.cleanup();
    // Every guest this run started names its data dir on its command line.
    await killGuestsUnder(ext4Root);
    if (xfs) await killGuestsUnder(xfs.dir);
    await rm(ext4Root, { recursive: true, force: true });
    await xfs?.cleanup();
  };
  // Ctrl-C mid-run: no guest, mount or loop device may outlive the benchmark.
  const onSignal = () => {
    void cleanup().finally(() => process.exit(130));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  // The guests are unref'd children and QMP waits are sockets that may close: without a handle of
  // its own the process could end mid-await (exit 13) and skip the cleanup below.
  const keepAlive = setInterval(() => {}, 60_000);
  try {
    xfs = await mountXfsLoop({ sizeBytes: 32 * 1024 * MiB });
    for (const [name, root] of [
      ["ext4", ext4Root],
      ["xfs", xfs.dir],
    ] as const) {
      const paths = agentPaths(root);
      const images = new ImageStore(paths.imagesDir);
      await images.import(layout);
      const ns = await spaces.create(`bench-${name}`);
      const network = await HostNetwork.open({ netns: ns });
      const probe = spaces.spawn(ns, [process.execPath, PROBE, "waiter"], { input: true });
      const net: BenchNet = { ns, network, probe, answers: [], next: 10 };
      probe.stdout?.on("data", (b: Buffer) => {
        for (const l of b.toString().split("\n")) if (l.includes("answered")) net.answers.push(l);
      });
      const driver = new QemuDriver(paths, {
        assets,
        accel: "tcg",
        images,
        network,
        bootTimeoutMs: 120_000,
      });
      const fstype = execFileSync("findmnt", ["-n", "-o", "FSTYPE", "-T", root]).toString().trim();
      dirs.push({ name, net, fstype, root, paths, store: new QemuStore(paths.qemu), driver });
    }

    // One source guest per data dir and size, booted once, parked in Standby between figures so
    // that idle guests do not take CPU from the one being measured.
    for (const d of dirs) {
      for (const [i, mib] of sizes.entries()) {
        const id = `src${mib}`;
        const t0 = performance.now();
        const fillMiB = Math.floor(mib * fill);
        // tmpfs pages are real guest memory: written once, they are in the RAM file for good.
        const cmd = [
          "sh",
          "-c",
          `nc -ll -p ${PORT} -e echo ok & dd if=/dev/zero of=/run/fill bs=1M count=${fillMiB} 2>/dev/null; exec /usr/bin/count`,
        ];
        await d.driver.create(spec(d, id, mib, `02:0b:00:${hex(i)}:00:01`, cmd), timedCtx());
        await waitFor(
          `${d.name} ${id} counting`,
          () => (serialCounts(d.paths, id).length >= 2 ? true : undefined),
          180_000,
          200,
        );
        await d.driver.standby(id, timedCtx());
        const st = await stat(d.paths.qemu.memFile(id));
        ramBytes.set(`${d.name}|${mib}`, st.blocks * 512);
        log(
          `${d.name} (${d.fstype}): ${id} booted and filled in ${ms(performance.now() - t0)}, RAM file holds ${Math.round((st.blocks * 512) / MiB)} MiB`,
        );
      }
    }

    // Repetitions interleaved across data dirs and sizes: drift on this shared machine spreads
    // over every figure instead of landing on one.
    for (let rep = 0; rep < reps; rep++) {
      for (const d of dirs) {
        for (const [i, mib] of sizes.entries()) {
          const source = `src${mib}`;
          const mac = (kind: number) => `02:0f:${hex(i)}:${hex(rep)}:${hex(kind)}:01`;
          const add = (metric: string, v: number) => samples.add(d.name, mib, metric, v);

          // (1) fork from Standby, the driver's way.
          const viaDriver = await driverFork(d, spec(d, `f${mib}c${rep}`, mib, mac(1)), source);
          for (const [k, v] of Object.entries(viaDriver)) add(`fork.driver.${k}`, v);
          await d.driver.delete(`f${mib}c${rep}`, timedCtx());
          // (4) the same with full copies.
          const naive = await naiveFork(d, spec(d, `f${mib}n${rep}`, mib, mac(2)), source);
          for (const [k, v] of Object.entries(naive)) add(`fork.naive.${k}`, v);
          await d.driver.delete(`f${mib}n${rep}`, timedCtx());
          // (2) the same snapshot restored by hand.
          const hand = await handRestore(d, source, assets);
          for (const [k, v] of Object.entries(hand)) add(`hand.${k}`, v);
          // (3) from_running as the control plane runs it: standby → fork (made in Standby) →
          // restore the source [pause ends] → start the fork. Naive: full copies, the fork
          // restored before the source.
          await d.driver.restore(source, timedCtx());
          for (const [mode, kind] of [
            ["driver", 3],
            ["naive", 4],
          ] as const) {
            await sleep(500); // running, and dirtying its memory, as a live source would be
            const target = spec(d, `f${mib}r${kind}x${rep}`, mib, mac(kind));
            const t0 = performance.now();
            await d.driver.standby(source, timedCtx());
            const t1 = performance.now();
            if (mode === "driver") {
              await d.driver.fork(
                { source_id: source, target, target_state: "Standby" },
                timedCtx(),
              );
            } else await naiveFork(d, target, source);
            const t2 = performance.now();
            const back = await d.driver.restore(source, timedCtx());
            const t3 = performance.now();
            if (back.state !== "Running") throw new Error(`source ${source} not Running again`);
            if (mode === "driver") {
              const started = await d.driver.restore(target.id, timedCtx());
              if (started.state !== "Running") throw new Error(`fork ${target.id} not started`);
              add("paused.driver.running", performance.now() - t0);
              await waitAnswer(d.net, target.network.ip ?? "");
              add("paused.driver.tcp", performance.now() - t0);
            }
            add(`paused.${mode}.total`, t3 - t0);
            add(`paused.${mode}.standby`, t1 - t0);
            add(`paused.${mode}.fork`, t2 - t1);
            add(`paused.${mode}.restore`, t3 - t2);
            await d.driver.delete(target.id, timedCtx());
          }
          await d.driver.standby(source, timedCtx());
          log(
            `rep ${rep + 1}/${reps} ${d.name} ${mib} MiB: fork ${ms(viaDriver.total)} (naive ${ms(naive.total)}), hand restore ${ms(hand.cont)}, paused ${ms(samples.get(d.name, mib, "paused.driver.total").at(-1) ?? Number.NaN)}`,
          );
        }
      }
    }
    const elapsed = (performance.now() - started) / 1000;
    const text = report({
      command: opts.command,
      dirs,
      sizes,
      fill,
      reps,
      samples,
      ramBytes,
      loadBefore,
      loadAfter: os.loadavg(),
      elapsed,
      qemu: execFileSync(assets.qemu, ["--version"]).toString().split("\n")[0] ?? "",
    });
    log(`done in ${elapsed.toFixed(0)} s`);
    return text;
  } finally {
    clearInterval(keepAlive);
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    await cleanup();
  }
}

/** driver.fork to Running, with the time of each of its steps. */
async function driverFork(d: DataDir, target: InstanceSpec, source: string) {
  const ctx = timedCtx();
  const t0 = performance.now();
  const [, fork] = await d.driver.fork({ source_id: source, target, target_state: "Running" }, ctx);
  const t1 = performance.now();
  await waitAnswer(d.net, target.network.ip ?? "");
  const tcp = performance.now() - t0;
  if (fork.state !== "Running") throw new Error(`fork ${target.id} is ${fork.state}`);
  if (d.name === "xfs" && d.driver.lastDiskClone !== "reflink") {
    // The figures would be labelled with a path they did not take.
    throw new Error(`fork on XFS cloned its disk by ${d.driver.lastDiskClone}, not reflink`);
  }
  d.copyPath = `RAM ${d.driver.lastCopyPath}, disk ${d.driver.lastDiskClone}`;
  const at = (step: string) => {
    const m = ctx.marks.find(([s]) => s === step);
    if (!m) throw new Error(`fork did not record step ${step}: ${ctx.marks.map(([s]) => s)}`);
    return m[1];
  };
  const identity = d.driver.lastIdentityMs ?? 0;
  return {
    total: t1 - t0,
    tcp,
    disk: at("clone-disk") - t0,
    memory: at("clone-memory") - at("clone-disk"),
    register: at("register") - at("clone-memory"),
    qemu: at("restore") - at("register") - identity,
    identity,
  };
}

/** A fork without copy-on-write: full copies of the RAM file and the disk, then the driver
 * restores the copy exactly as it restores its own forks (same launch, same identity step). */
async function naiveFork(d: DataDir, target: InstanceSpec, source: string) {
  const q = d.paths.qemu;
  const read = await d.store.read(source);
  if (read.kind !== "ok") throw new Error(`source ${source}: ${read.kind}`);
  const src = read.record;
  const id = target.id;
  const t0 = performance.now();
  await mkdir(q.instanceDir(id));
  await execa(QEMU_IMG, ["convert", "-O", "qcow2", q.diskFile(source), q.diskFile(id)]);
  await writeFile(q.configFile(id), guestConfig(target, src.image));
  const t1 = performance.now();
  // The source's RAM: its own file, or the memory base a driver fork froze it into.
  await execa("cp", ["--reflink=never", src.ram_base ?? q.memFile(source), q.memFile(id)]);
  await copyFile(q.devStateFile(source), q.devStateFile(id));
  const t2 = performance.now();
  const ctx = timedCtx();
  const rec: QemuRecord = {
    created_by: ctx.commandId,
    spec: target,
    image: src.image,
    // The device state fixes the layout; the MAC is the target's (the driver's rule for forks).
    machine: { ...src.machine, mac: target.network.mac },
    pid: null,
    serial_offset: 0,
    ram: "file",
    ram_base: null,
    disk_base: null,
    compressed: null,
    guest_identity: null,
    observed: {
      id,
      state: "Standby",
      has_snapshot: true,
      state_error: null,
      exit_code: null,
      exit_message: null,
      started_at: null,
      stopped_at: null,
    },
  };
  await d.store.write(rec);
  const t3 = performance.now();
  const out = await d.driver.restore(id, ctx);
  const t4 = performance.now();
  if (out.state !== "Running") throw new Error(`naive fork ${id} is ${out.state}`);
  const identity = d.driver.lastIdentityMs ?? 0;
  return {
    total: t4 - t0,
    disk: t1 - t0,
    memory: t2 - t1,
    register: t3 - t2,
    qemu: t4 - t3 - identity,
    identity,
  };
}

/** The source's snapshot restored by a QEMU launched here, on copies of its files (copied before
 * the clock starts), with the same devices the driver gives the guest. */
async function handRestore(d: DataDir, source: string, assets: VmAssets) {
  const q = d.paths.qemu;
  const read = await d.store.read(source);
  if (read.kind !== "ok") throw new Error(`source ${source}: ${read.kind}`);
  const rec = read.record;
  const dir = path.join(d.root, "hand");
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir);
  const f = (n: string) => path.join(dir, n);
  // Its RAM: its own file, or the memory base a driver fork froze it into.
  await execa("cp", [
    "--reflink=auto",
    "--sparse=always",
    rec.ram_base ?? q.memFile(source),
    f("mem"),
  ]);
  await copyFile(q.devStateFile(source), f("devstate"));
  // The qcow2 overlay keeps its backing file (a read-only base or the blank template).
  await copyFile(q.diskFile(source), f("disk.qcow2"));
  await copyFile(q.configFile(source), f("config.sh"));
  // The driver's device layout, in its order: a device-state stream only loads into the same,
  // and into a NIC backend with the same offloads (a TAP: made here, before the clock starts).
  const tap = await d.net.network.ensureTap(HAND, { downloadBps: null, uploadBps: null });
  const extra = [
    ...guestDevices(
      { root: rec.image.rootfs, rw: f("disk.qcow2"), cfg: f("config.sh") },
      rec.machine.mac === null
        ? null
        : { mac: rec.machine.mac, netdev: `tap,id=net0,ifname=${tap},script=no,downscript=no` },
      rec.spec.disk_io_bps,
    ),
    "-S",
    "-incoming",
    "defer",
  ];
  const guest: GuestSpec = {
    qemu: assets.qemu,
    execPrefix: d.net.network.execPrefix,
    kernel: assets.kernelElf,
    initramfs: assets.initramfs,
    accel: "tcg",
    memoryMiB: rec.machine.memory_mib,
    vcpus: rec.machine.vcpus,
    memFile: f("mem"),
    shareMemory: true,
    qmpSocket: f("qmp.sock"),
    ctlSocket: f("ctl.sock"),
    serialLog: f("serial.log"),
    qemuLog: f("qemu.log"),
    appendSerial: true,
    extraArgs: extra,
  };
  const t0 = performance.now();
  const vm = await launchQemu(guest);
  try {
    const t1 = performance.now();
    await vm.qmp.execute("migrate-set-capabilities", {
      capabilities: [{ capability: "x-ignore-shared", state: true }],
    });
    await vm.qmp.execute("migrate-incoming", { uri: `exec:cat ${shellQuote(f("devstate"))}` });
    await waitPaused(vm.qmp);
    const t2 = performance.now();
    await vm.qmp.execute("cont");
    const t3 = performance.now();
    // Not part of a plain restore: when the restored guest first answers, for comparison with
    // the driver's identity step (which needs the guest to answer, too).
    await guestControl(guest.ctlSocket, "ping", { timeoutMs: 10_000 });
    const t4 = performance.now();
    return { cont: t3 - t0, launch: t1 - t0, incoming: t2 - t1, ping: t4 - t3 };
  } finally {
    await vm.qmp.close();
    killProcess(vm.pid);
    // QEMU is an unref'd child (guests outlive the agent by design): the timer keeps the event
    // loop alive until its exit is seen.
    while (!(await Promise.race([vm.exited.then(() => true), sleep(20).then(() => false)]))) {}
    await rm(dir, { recursive: true, force: true });
    await d.net.network.removeTap(HAND);
  }
}

/** As the driver waits: query-status every 10 ms until the incoming migration has loaded. */
async function waitPaused(qmp: QmpClient): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const s = await qmp.execute<{ status: string }>("query-status");
    if (s.status === "paused") return;
    const m = await qmp.execute<{ status?: string; "error-desc"?: string }>("query-migrate");
    if (m.status === "failed") throw new Error(`incoming migration failed: ${m["error-desc"]}`);
    if (Date.now() >= deadline) throw new Error(`restored guest not paused (${s.status})`);
    await sleep(10);
  }
}

// ---- the report ---------------------------------------------------------------------------------

function ms(v: number): string {
  if (!Number.isFinite(v)) return "–";
  return v < 10 ? `${v.toFixed(1)} ms` : `${Math.round(v)} ms`;
}

const sizeName = (mib: number) => (mib >= 1024 ? `${mib / 1024} GiB` : `${mib} MiB`);

interface ReportInput {
  command: string;
  dirs: DataDir[];
  sizes: readonly number[];
  fill: number;
  reps: number;
  samples: Samples;
  ramBytes: Map<string, number>;
  loadBefore: number[];
  loadAfter: number[];
  elapsed: number;
  qemu: string;
}

function report(r: ReportInput): string {
  const { samples: s, sizes, dirs } = r;
  const small = sizes[0] ?? 256;
  const big = sizes.at(-1) ?? 1024;
  const cols: Array<{ d: DataDir; mode: Mode }> = dirs.flatMap((d) =>
    (["driver", "naive"] as const).map((mode) => ({ d, mode })),
  );
  const colName = ({ d, mode }: { d: DataDir; mode: Mode }) =>
    mode === "driver"
      ? `${d.name === "xfs" ? "XFS reflink=1" : d.fstype}: driver (${d.copyPath ?? "?"})`
      : `${d.name === "xfs" ? "XFS reflink=1" : d.fstype}: naive full copy`;
  const med = (d: DataDir, mib: number, metric: string) => s.median(d.name, mib, metric);
  const withRange = (d: DataDir, mib: number, metric: string) => {
    const v = s.get(d.name, mib, metric);
    if (v.length === 0) return "–";
    return `${ms(percentile(v, 50))} (${Math.round(Math.min(...v))}–${Math.round(Math.max(...v))})`;
  };
  const ratio = (a: number, b: number) => (a / b).toFixed(2);
  const row = (label: string, f: (c: { d: DataDir; mode: Mode }) => string, target = "") =>
    `| ${label} | ${cols.map(f).join(" | ")} | ${target} |`;
  const header = [
    `| figure | ${cols.map(colName).join(" | ")} | target |`,
    `|---|${cols.map(() => "---|").join("")}---|`,
  ];
  const lines: string[] = [];
  const cpu = os.cpus()[0]?.model ?? "unknown";
  const load = (l: number[]) => l.map((x) => x.toFixed(1)).join(" / ");
  lines.push(
    "## Fork with real QEMU guests (QemuDriver)",
    "",
    `Produced by \`${r.command}\` (bench/vm.ts) on ${new Date().toISOString().slice(0, 10)} in ${r.elapsed.toFixed(0)} s: ${os.cpus().length} × ${cpu}, ${r.qemu}, TCG (this machine has no usable KVM), load average (1/5/15 min) ${load(r.loadBefore)} before and ${load(r.loadAfter)} after.`,
    `Guests: microvm, 1 vCPU, the busybox test image, network on (a TAP on a bridge in a network namespace of the run's own; the plain restore by hand gets a TAP too, made before its clock starts), each guest answering TCP on one port, a 10 GiB instance disk; before counting, each guest writes ${Math.round(r.fill * 100)} % of its RAM into a tmpfs, so at the snapshot the RAM file holds ${sizes.map((mib) => `${Math.round((r.ramBytes.get(`ext4|${mib}`) ?? 0) / MiB)} MiB (${sizeName(mib)} guest)`).join(" and ")} of data; the rest is a hole.`,
    `Driver-level wall times in this process (no control plane or HTTP). Medians of ${r.reps} repetitions per figure, (min–max) in ms; repetitions interleaved across data dirs and sizes; ratios are of medians from this run. Data dirs side by side: ${dirs.map((d) => `${d.name === "xfs" ? "XFS (`mkfs.xfs -m reflink=1` on a loop device, its file on ext4)" : `the default one (${d.fstype}, \`${os.tmpdir()}\`, no reflink)`}`).join(" and ")}.`,
    "",
    ...header,
    row(`(1) fork from Standby → Running, ${sizeName(small)}`, ({ d, mode }) =>
      withRange(d, small, `fork.${mode}.total`),
    ),
    row(`(1) fork from Standby → Running, ${sizeName(big)}`, ({ d, mode }) =>
      withRange(d, big, `fork.${mode}.total`),
    ),
    row(
      `(1) ratio ${sizeName(big)} / ${sizeName(small)}`,
      ({ d, mode }) =>
        `**${ratio(med(d, big, `fork.${mode}.total`), med(d, small, `fork.${mode}.total`))}**`,
      "≤ 1.2",
    ),
    ...sizes.map((mib) =>
      row(
        `(1) fork from Standby: request → the fork answers TCP on its new IP, ${sizeName(mib)}`,
        ({ d, mode }) => (mode === "driver" ? withRange(d, mib, "fork.driver.tcp") : "–"),
      ),
    ),
    ...sizes.map((mib) =>
      row(`(3) fork from Running: request → the fork Running, ${sizeName(mib)}`, ({ d, mode }) =>
        mode === "driver" ? withRange(d, mib, "paused.driver.running") : "–",
      ),
    ),
    ...sizes.map((mib) =>
      row(
        `(3) fork from Running: request → the fork answers TCP on its new IP, ${sizeName(mib)}`,
        ({ d, mode }) => (mode === "driver" ? withRange(d, mib, "paused.driver.tcp") : "–"),
      ),
    ),
    ...sizes.map((mib) =>
      row(`(2) plain QEMU restore by hand (launch → \`cont\`), ${sizeName(mib)}`, ({ d }) =>
        withRange(d, mib, "hand.cont"),
      ),
    ),
    ...sizes.map((mib) =>
      row(
        `(2) fork ÷ plain restore, ${sizeName(mib)}`,
        ({ d, mode }) =>
          `**${ratio(med(d, mib, `fork.${mode}.total`), med(d, mib, "hand.cont"))}**`,
        "≤ 1.3",
      ),
    ),
    ...sizes.map((mib) =>
      row(
        `(2) for comparison: fork ÷ (plain restore + the guest's first answer), ${sizeName(mib)}`,
        ({ d, mode }) =>
          ratio(
            med(d, mib, `fork.${mode}.total`),
            med(d, mib, "hand.cont") + med(d, mib, "hand.ping"),
          ),
      ),
    ),
    ...sizes.map((mib) =>
      row(
        `(3) source paused in a from_running fork, ${sizeName(mib)}`,
        ({ d, mode }) => withRange(d, mib, `paused.${mode}.total`),
        "< 1 s",
      ),
    ),
    "",
    "(1) and (3)'s TCP answer is timed from the request until a probe on the host side of the bridge (inside the namespace, started before the run, retrying every 2 ms) got data from the fork's own address: the fork has taken its new MAC and address, announced them, and its program runs. (2)'s plain restore is the same measurement in both columns of a data dir (one baseline, restored from a copy of the snapshot the forks use). (3) is measured from the start of `driver.standby(source)` until `driver.restore(source)` resolved, with `driver.fork` (target Standby) between them; the fork is started after that, outside the pause — the sequence the control plane's fork flow runs for `from_running`. The naive column forks to Running (full copies) before restoring the source.",
    "",
    "### Where the time goes (medians, ms)",
    "",
    "A fork's phases, from the times the driver journals its steps: disk (ext4: freeze the source's disk into a base and put overlays on it; XFS: a reflink clone; and the config disk; naive: `qemu-img convert` of the whole chain), memory (freeze the source's RAM file into a memory base the fork maps, copy the device state; naive: `cp --reflink=never` of the RAM file), register (the record), QEMU restore (launch with `-incoming defer` → migrate-incoming → `cont`) and identity (the guest's control helper applies hostname, MAC, address, route, machine id, flushes its neighbours, sends a gratuitous ARP and reseeds its RNG; the driver's `lastIdentityMs`).",
    "",
    `| phase | ${sizes.flatMap((mib) => cols.map((c) => `${sizeName(mib)} ${c.d.name === "xfs" ? "XFS" : c.d.fstype} ${c.mode === "driver" ? "driver" : "naive"}`)).join(" | ")} |`,
    `|---|${sizes.flatMap(() => cols.map(() => "---|")).join("")}`,
    ...(["disk", "memory", "register", "qemu", "identity", "total"] as const).map(
      (p) =>
        `| ${p === "qemu" ? "QEMU restore" : p} | ${sizes
          .flatMap((mib) => cols.map(({ d, mode }) => ms(med(d, mib, `fork.${mode}.${p}`))))
          .join(" | ")} |`,
    ),
    "",
    `| plain restore by hand | ${sizes.flatMap((mib) => dirs.map((d) => `${sizeName(mib)} ${d.name === "xfs" ? "XFS" : d.fstype}`)).join(" | ")} |`,
    `|---|${sizes.flatMap(() => dirs.map(() => "---|")).join("")}`,
    ...(
      [
        ["launch (QEMU up, QMP connected)", "launch"],
        ["incoming (device state loaded, paused)", "incoming"],
        ["→ `cont` (the plain restore)", "cont"],
        ["after `cont`: guest answers a ping", "ping"],
      ] as const
    ).map(
      ([label, m]) =>
        `| ${label} | ${sizes.flatMap((mib) => dirs.map((d) => ms(med(d, mib, `hand.${m}`)))).join(" | ")} |`,
    ),
    "",
    `| from_running, source paused | ${sizes.flatMap((mib) => cols.map((c) => `${sizeName(mib)} ${c.d.name === "xfs" ? "XFS" : c.d.fstype} ${c.mode === "driver" ? "driver" : "naive"}`)).join(" | ")} |`,
    `|---|${sizes.flatMap(() => cols.map(() => "---|")).join("")}`,
    ...(["standby", "fork", "restore", "total"] as const).map(
      (p) =>
        `| ${p === "restore" ? "restore source" : p} | ${sizes
          .flatMap((mib) => cols.map(({ d, mode }) => ms(med(d, mib, `paused.${mode}.${p}`))))
          .join(" | ")} |`,
    ),
    "",
  );
  return lines.join("\n");
}

/** The command line that reproduces a run, with the environment that changes its figures. */
export function benchCommand(base: string): string {
  const env = ["BENCH_VM_REPS", "BENCH_VM_FILL"]
    .filter((k) => process.env[k] !== undefined)
    .map((k) => `${k}=${process.env[k]}`);
  return [...env, base].join(" ");
}

export function vmBenchOptionsFromEnv(command: string): VmBenchOptions {
  const num = (k: string) => (process.env[k] === undefined ? undefined : Number(process.env[k]));
  return { command: benchCommand(command), reps: num("BENCH_VM_REPS"), fill: num("BENCH_VM_FILL") };
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const text = await runVmBench(vmBenchOptionsFromEnv("npm run bench:vm"));
  writeBenchPart("vm", text);
  console.log(text);
}
