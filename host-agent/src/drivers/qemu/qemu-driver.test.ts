// The QEMU driver against real guests (QEMU 7.2 TCG, microvm). Four launches from a cold boot or a
// snapshot: create, restore, fork → Running, and a guest whose program exits.
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import type { ApiError, InstanceSpec, ObservedInstance } from "@offshoot/shared";
import { execa } from "execa";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { ensureTestImage } from "../../../../scripts/oci-image.ts";
import { ensureVmAssets, type VmAssets } from "../../../../scripts/vm-assets.ts";
import { waitFor } from "../../../testing/index.ts";
import {
  serialCounts as serialCountsOf,
  testGuestSpec,
  testMachine,
} from "../../../testing/qemu.ts";
import { ImageStore, type StoredImage } from "../../images/store.ts";
import { type AgentPaths, agentPaths } from "../../paths.ts";
import type { OpContext } from "../driver.ts";
import { guestMac } from "./control.ts";
import { backingChain, createInstanceDisk } from "./disks.ts";
import { exitMessage } from "./exit.ts";
import { guestConfig, guestHostname, holdsIdentity, identityOf } from "./guest-config.ts";
import { killProcess, launchQemu } from "./launch.ts";
import { QemuDriver } from "./qemu-driver.ts";
import { type QemuRecord, QemuStore } from "./store.ts";

const ASSETS_TIMEOUT = 5 * 60_000;

let assets: VmAssets;
let root: string;
let paths: AgentPaths;
let images: ImageStore;
let image: StoredImage;
const drivers: QemuDriver[] = [];
const timings: Record<string, number> = {};

beforeAll(async () => {
  assets = await ensureVmAssets();
  root = mkdtempSync(path.join(os.tmpdir(), "oqd-"));
  paths = agentPaths(root);
  images = new ImageStore(paths.imagesDir);
  image = await images.import(ensureTestImage());
}, ASSETS_TIMEOUT);

// One agent per data dir: a driver left polling would take a later test's events.
afterEach(async () => {
  for (const d of drivers.splice(0)) await d.close();
});

afterAll(async () => {
  // Whatever a failed test left running: every recorded pid and pid file.
  const dir = paths?.qemu.instancesDir;
  if (dir && existsSync(dir)) {
    for (const id of readdirSync(dir)) {
      for (const f of [paths.qemu.pidFile(id), paths.qemu.stateFile(id)]) {
        try {
          const text = readFileSync(f, "utf8");
          const pid = f.endsWith(".json")
            ? (JSON.parse(text) as { pid: number | null }).pid
            : Number.parseInt(text, 10);
          if (pid && isQemu(pid)) killProcess(pid);
        } catch {
          // no such file
        }
      }
    }
  }
  if (root) rmSync(root, { recursive: true, force: true });
  console.log(`qemu driver timings (ms): ${JSON.stringify(timings)}`);
}, 30_000);

function isQemu(pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(root);
  } catch {
    return false;
  }
}

function newDriver(): QemuDriver {
  const d = new QemuDriver(paths, {
    assets,
    accel: "tcg",
    images,
    bootTimeoutMs: 60_000,
    stopTimeoutMs: 3_000,
    pollMs: 200,
  });
  drivers.push(d);
  return d;
}

let commandSeq = 0;
function ctx(): OpContext & { recorded: string[] } {
  const recorded: string[] = [];
  return {
    commandId: `cmd-${++commandSeq}`,
    recorded,
    steps: { record: async (s) => void recorded.push(s) },
  };
}

const spec = testGuestSpec;
const serialCounts = (id: string) => serialCountsOf(paths, id);

async function timed<T>(name: string, p: () => Promise<T>): Promise<T> {
  const started = Date.now();
  const v = await p();
  timings[name] = Date.now() - started;
  return v;
}

describe("QemuDriver", () => {
  it("knows a guest holding its identity, in this agent's form or an older agent's", () => {
    const rec = {
      spec: testGuestSpec("idt1", { name: "Web 1" }, "02:00:00:00:0c:01", {
        ip: "10.64.0.9",
        subnet: "10.64.0.0/20",
      }),
      machine: { memory_mib: 256, vcpus: 1, mac: "02:00:00:00:0c:01" },
      observed: { id: "idt1", state: "Standby", has_snapshot: true },
    } as QemuRecord;
    expect(identityOf(rec)).toMatch(
      /^web-1 02:00:00:00:0c:01 10\.64\.0\.9\/20 10\.64\.0\.1 [0-9a-f]{32}$/,
    );
    expect(holdsIdentity({ ...rec, guest_identity: identityOf(rec) })).toBe(true);
    // Booted by an agent that recorded "hostname MAC": a plain restore sends nothing.
    expect(holdsIdentity({ ...rec, guest_identity: "web-1 02:00:00:00:0c:01" })).toBe(true);
    // A fork still holds its source's identity, in either form.
    expect(holdsIdentity({ ...rec, guest_identity: "src 02:00:00:00:0c:02" })).toBe(false);
    expect(holdsIdentity({ ...rec, guest_identity: null })).toBe(false);
  });

  it("formats exits like Hypeman and writes the guest's config as docker run would", () => {
    expect(exitMessage(3)).toBe("exited with code 3");
    expect(exitMessage(127)).toBe("command not found");
    expect(exitMessage(137)).toBe("killed by signal 9 (SIGKILL)");
    expect(exitMessage(137, true)).toBe("killed by signal 9 (SIGKILL) - OOM");
    const img = {
      name: "i",
      entrypoint: ["/ep"],
      cmd: ["default"],
      env: { PATH: "/bin", A: "image" },
      working_dir: "/w",
    };
    const own = {
      id: "box1",
      name: "My_Box.1",
      entrypoint: null,
      cmd: null,
      env: {},
      network: testGuestSpec("box1").network,
    };
    const text = guestConfig({ ...own, env: { A: "it's" } }, img);
    expect(text.length % 4096).toBe(0);
    expect(text).toContain("OFFSHOOT_HOSTNAME='my-box-1'");
    expect(text).toContain("OFFSHOOT_WORKDIR='/w'");
    expect(text).toContain("export PATH='/bin'");
    expect(text).toContain("export A='it'\\''s'");
    expect(text).toContain("set -- '/ep' 'default'\n");
    // cmd replaces the image's cmd; an entrypoint replaces both.
    expect(guestConfig({ ...own, cmd: ["x"] }, img)).toContain("set -- '/ep' 'x'\n");
    expect(guestConfig({ ...own, entrypoint: ["/other"] }, img)).toContain("set -- '/other'\n");
    expect(() => guestConfig(own, { ...img, entrypoint: null, cmd: null })).toThrow(
      /no entrypoint or cmd/,
    );
    expect(() => guestConfig({ ...own, env: { "A-B": "1" } }, img)).toThrow(/environment/);
    expect(guestHostname("---")).toBe("offshoot");
  });

  it("creates, snapshots, restores and forks a counting guest; memory carries over", async () => {
    const driver = newDriver();
    expect(driver.capabilities()).toMatchObject({ fork_from_standby: true, standby: true });

    // create → Running, counting
    const a = await timed("create→Running", () =>
      driver.create(spec("srca", { disk_io_bps: 50_000_000 }, "02:00:00:00:0a:01"), ctx()),
    );
    expect(a).toMatchObject({ id: "srca", state: "Running", has_snapshot: false });
    await waitFor(
      "3 counts",
      () => (serialCounts("srca").length >= 3 ? true : undefined),
      20_000,
      100,
    );
    const cmdline = readFileSync(`/proc/${readPid("srca")}/cmdline`, "utf8");
    expect(cmdline).toContain("mac=02:00:00:00:0a:01");
    // disk_io_bps: QEMU throttles both of the guest's disks.
    expect(cmdline.match(/throttling\.bps-total=50000000/g)).toHaveLength(2);

    // standby → restore: the counter continues past where it was
    const sb = await timed("standby", () => driver.standby("srca", ctx()));
    expect(sb).toMatchObject({ state: "Standby", has_snapshot: true });
    expect(existsSync(paths.qemu.memFile("srca"))).toBe(true);
    expect(existsSync(paths.qemu.devStateFile("srca"))).toBe(true);
    const before = serialCounts("srca");
    const c1 = before.at(-1) ?? -1;
    expect(c1).toBeGreaterThanOrEqual(2);
    const restored = await timed("restore", () => driver.restore("srca", ctx()));
    expect(restored).toMatchObject({ state: "Running", has_snapshot: false });
    const after = await waitFor(
      "counts after restore",
      () => {
        const all = serialCounts("srca");
        return all.length >= before.length + 2 ? all.slice(before.length) : undefined;
      },
      15_000,
      100,
    );
    expect(after[0]).toBe(c1 + 1);
    // A plain restore skips the identity command (the guest holds its identity already); its
    // NIC still has the recorded MAC.
    timings["restore: apply identity"] = driver.lastIdentityMs ?? -1;
    expect(await guestMac(paths.qemu.ctlSocket("srca"))).toBe("02:00:00:00:0a:01");

    // standby again, fork the snapshot to Running under a new MAC
    await driver.standby("srca", ctx());
    const c2 = serialCounts("srca").at(-1) ?? -1;
    expect(c2).toBeGreaterThan(c1);
    const forkCtx = ctx();
    const [src, fork] = await timed("fork→Running", () =>
      driver.fork(
        {
          source_id: "srca",
          target: spec("forkb", {}, "02:00:00:00:0b:01"),
          target_state: "Running",
        },
        forkCtx,
      ),
    );
    console.log(`fork steps: ${forkCtx.recorded.join(", ")}; memory copy: ${driver.lastCopyPath}`);
    expect(src).toMatchObject({ id: "srca", state: "Standby", has_snapshot: true });
    expect(fork).toMatchObject({ id: "forkb", state: "Running", has_snapshot: false });
    // No RAM was copied: the source's RAM file became one frozen base that both map privately.
    expect(driver.lastCopyPath).toBe("frozen-base");
    expect(existsSync(paths.qemu.memFile("srca"))).toBe(false);
    expect(existsSync(paths.qemu.memFile("forkb"))).toBe(false);
    const [memBase] = readdirSync(paths.qemu.memBasesDir);
    expect(readdirSync(paths.qemu.memBasesDir)).toHaveLength(1);
    expect(readFileSync(`/proc/${readPid("forkb")}/cmdline`, "utf8")).toContain(
      `mem-path=${paths.qemu.memBaseFile(memBase ?? "")},share=off`,
    );
    expect(readFileSync(`/proc/${readPid("forkb")}/cmdline`, "utf8")).toContain(
      "mac=02:00:00:00:0b:01",
    );
    // Inside the guest the fork's NIC has the fork's MAC, not the source's.
    timings["fork: apply identity"] = driver.lastIdentityMs ?? -1;
    expect(await guestMac(paths.qemu.ctlSocket("forkb"))).toBe("02:00:00:00:0b:01");
    // The fork's serial log is its own: its first count continues the source's, not 0.
    const forkCounts = await waitFor(
      "fork counts",
      () => {
        const c = serialCounts("forkb");
        return c.length >= 2 ? c : undefined;
      },
      15_000,
      100,
    );
    expect(forkCounts[0]).toBe(c2 + 1);

    // Both go on independently from the same point.
    await driver.restore("srca", ctx());
    const srcNext = await waitFor(
      "source counts again",
      () => {
        const all = serialCounts("srca");
        return (all.at(-1) ?? 0) > c2 + 1 ? all.at(-1) : undefined;
      },
      15_000,
      100,
    );
    expect(srcNext).toBeGreaterThan(c2 + 1);
    expect(await guestMac(paths.qemu.ctlSocket("srca"))).toBe("02:00:00:00:0a:01");
    expect(readPid("srca")).not.toBe(readPid("forkb"));

    // The source, restored, took a writable copy of its frozen RAM; forkb still maps the base.
    expect(existsSync(paths.qemu.memFile("srca"))).toBe(true);
    expect(readdirSync(paths.qemu.memBasesDir)).toHaveLength(1);

    // Deleting the source leaves the fork running on the frozen bases (disk and memory).
    await driver.delete("srca", ctx());
    expect(existsSync(paths.qemu.instanceDir("srca"))).toBe(false);
    expect(await driver.get("srca")).toBeNull();
    await driver.delete("srca", ctx()); // idempotent
    const n = serialCounts("forkb").length;
    await waitFor(
      "fork still counting",
      () => (serialCounts("forkb").length >= n + 2 ? true : undefined),
      10_000,
      100,
    );
    expect(readdirSync(paths.qemu.basesDir)).toHaveLength(1);
    expect(readdirSync(paths.qemu.memBasesDir)).toHaveLength(1);

    // A fork has its RAM in private pages over the base only: its standby writes them into the
    // snapshot (then nothing maps the base: it goes), and its restore loads them into a RAM
    // file of its own.
    const streamed = await timed("standby (RAM streamed)", () => driver.standby("forkb", ctx()));
    expect(streamed).toMatchObject({ state: "Standby", has_snapshot: true });
    expect(readdirSync(paths.qemu.memBasesDir)).toHaveLength(0);
    const c3 = serialCounts("forkb").at(-1) ?? -1;
    await timed("restore (RAM streamed)", () => driver.restore("forkb", ctx()));
    expect(existsSync(paths.qemu.memFile("forkb"))).toBe(true);
    const resumed = await waitFor(
      "counts after the streamed restore",
      () => {
        const all = serialCounts("forkb");
        return (all.at(-1) ?? -1) > c3 ? all.slice(all.lastIndexOf(c3) + 1) : undefined;
      },
      15_000,
      100,
    );
    expect(resumed[0]).toBe(c3 + 1);

    // A restarted agent re-attaches by pid + QMP socket and can stop the guest.
    await driver.close();
    const again = newDriver();
    expect(await again.inventory()).toEqual([
      expect.objectContaining({ id: "forkb", state: "Running" }),
    ]);
    const stopped = await again.stop("forkb", ctx());
    expect(stopped).toMatchObject({ state: "Stopped", has_snapshot: false });
    // Gracefully: the guest's init SIGTERMed the program (143) and powered off.
    expect(readFileSync(paths.qemu.serialLog("forkb"), "utf8")).toContain(
      'OFFSHOOT-INIT {"event":"exit","code":143}',
    );
    expect(stopped.stopped_at).toBeTruthy();
    expect(isQemu(Number(readPid("forkb")))).toBe(false);
    expect(existsSync(paths.qemu.memFile("forkb"))).toBe(false);
    expect(existsSync(paths.qemu.diskFile("forkb"))).toBe(true);

    await again.delete("forkb", ctx());
    expect(readdirSync(paths.qemu.basesDir)).toHaveLength(0);
    // One agent per data dir: a second driver polling it would take the next test's events.
    await again.close();
  }, 240_000);

  it("a guest that cannot boot fails its create with boot_failed and what QEMU and the guest said", async () => {
    const driver = newDriver();
    // Below what the kernel and /init need (the control plane and the agent's checks refuse this
    // size before a driver sees it; this is the driver's own answer).
    const err = await driver.create(spec("tiny", { memory_bytes: 48 * 1024 * 1024 }), ctx()).then(
      () => undefined,
      (e: unknown) => e as ApiError,
    );
    expect(err?.code).toBe("boot_failed");
    expect(err?.message).toMatch(/^QEMU for tiny exited during boot: /);
    expect(driver.capabilities().min_memory_bytes).toBeGreaterThan(48 * 1024 * 1024);
    await driver.delete("tiny", ctx());
  }, 120_000);

  it("reports a guest program's exit as a Stopped event with its code", async () => {
    const driver = newDriver();
    const events: ObservedInstance[] = [];
    driver.onEvent((e) => events.push(e));
    const c = await driver.create(
      spec("exiter", { cmd: ["sh", "-c", "sleep 1; exit $CODE"], env: { CODE: "3" } }),
      ctx(),
    );
    expect(c.state).toBe("Running");
    const ev = await waitFor(
      "exit event",
      () => events.find((e) => e.id === "exiter"),
      30_000,
      100,
    ).catch((e: unknown) => {
      const tail = (f: string) => (existsSync(f) ? readFileSync(f, "utf8").slice(-1500) : "(none)");
      throw new Error(
        `${(e as Error).message}; state ${tail(paths.qemu.stateFile("exiter"))}; serial ${tail(paths.qemu.serialLog("exiter"))}`,
      );
    });
    expect(ev).toMatchObject({
      state: "Stopped",
      exit_code: 3,
      exit_message: "exited with code 3",
    });
    expect(await driver.get("exiter")).toMatchObject({ state: "Stopped", exit_code: 3 });

    // start boots the same disk again; the earlier exit marker in the log is not this boot's.
    const restarted = await timed("start→Running", () =>
      driver.start({ instance_id: "exiter", cmd: ["sh", "-c", "sleep 2; exit 127"] }, ctx()),
    );
    expect(restarted).toMatchObject({ state: "Running", exit_code: null });
    const second = await waitFor(
      "second exit event",
      () => events.find((e) => e.id === "exiter" && e.exit_code !== 3),
      30_000,
      100,
    );
    expect(second).toMatchObject({ exit_code: 127, exit_message: "command not found" });

    // A program that ignores SIGTERM is given stopTimeoutMs, then QEMU is quit.
    await driver.start(
      {
        instance_id: "exiter",
        cmd: ["sh", "-c", 'trap "" TERM; echo TRAP-SET; while :; do sleep 1; done'],
      },
      ctx(),
    );
    // Running means started, not that the program has set its trap yet.
    await waitFor(
      "the trap",
      () =>
        readFileSync(paths.qemu.serialLog("exiter"), "utf8").includes("TRAP-SET")
          ? true
          : undefined,
      15_000,
      100,
    );
    const pid = Number(readPid("exiter"));
    const stopStarted = Date.now();
    expect(await driver.stop("exiter", ctx())).toMatchObject({ state: "Stopped" });
    timings["stop (SIGTERM ignored)"] = Date.now() - stopStarted;
    expect(Date.now() - stopStarted).toBeGreaterThanOrEqual(3_000);
    expect(isQemu(pid)).toBe(false);
    await driver.delete("exiter", ctx());
  }, 120_000);
});

describe("QemuDriver without booting", () => {
  /** A Stopped instance as create + stop would leave it: a disk and a record. */
  async function stoppedInstance(id: string, over: Partial<InstanceSpec> = {}): Promise<void> {
    await mkdir(paths.qemu.instanceDir(id), { recursive: true });
    await createInstanceDisk(
      { qemuImg: "/usr/bin/qemu-img" },
      paths.qemu,
      paths.qemu.diskFile(id),
      64 * 1024 * 1024,
    );
    await new QemuStore(paths.qemu).write({
      created_by: "seed",
      spec: spec(id, over),
      image,
      machine: { memory_mib: 256, vcpus: 1, mac: null, agent_port: true },
      pid: null,
      serial_offset: 0,
      ram: "file",
      ram_base: null,
      disk_base: null,
      compressed: null,
      guest_identity: null,
      observed: { id, state: "Stopped", has_snapshot: false, stopped_at: new Date().toISOString() },
    });
  }

  it("forks a Stopped source onto a frozen base; rollback and delete clean up", async () => {
    const driver = newDriver();
    await stoppedInstance("cold");
    const [src, tgt] = await driver.fork(
      { source_id: "cold", target: spec("coldfork"), target_state: "Stopped" },
      ctx(),
    );
    expect(src.state).toBe("Stopped");
    expect(tgt).toMatchObject({ id: "coldfork", state: "Stopped", has_snapshot: false });
    const srcChain = await backingChain(paths.qemu.diskFile("cold"));
    const tgtChain = await backingChain(paths.qemu.diskFile("coldfork"));
    // Read from the headers as qemu-img reads them.
    const byQemuImg = JSON.parse(
      (
        await execa("qemu-img", [
          "info",
          "-U",
          "--output=json",
          "--backing-chain",
          paths.qemu.diskFile("coldfork"),
        ])
      ).stdout,
    ) as Array<{ filename: string }>;
    expect(tgtChain).toEqual(byQemuImg.map((i) => i.filename));
    // Both are overlays on the same frozen base, which neither writes.
    expect(srcChain).toHaveLength(3); // overlay → frozen base → blank ext4
    expect(tgtChain[1]).toBe(srcChain[1]);
    expect(srcChain[1]?.startsWith(paths.qemu.basesDir)).toBe(true);

    // A crashed fork by another command id leaves the existing target alone…
    const op = {
      kind: "fork" as const,
      source_id: "cold",
      target: spec("coldfork"),
      target_state: "Stopped" as const,
    };
    await driver.rollback(op, { commandId: "someone-else", steps: [] });
    expect(await driver.get("coldfork")).not.toBeNull();
    // …and removes it when it was that command's own.
    const own = (await new QemuStore(paths.qemu).read("coldfork")) as {
      kind: "ok";
      record: { created_by: string };
    };
    const observed = await driver.rollback(op, { commandId: own.record.created_by, steps: [] });
    expect(observed.map((o) => o.id)).toEqual(["cold"]);
    expect(existsSync(paths.qemu.instanceDir("coldfork"))).toBe(false);

    // The base stays while the source's overlay uses it, and goes with the last user.
    expect(readdirSync(paths.qemu.basesDir)).toHaveLength(1);
    await driver.delete("cold", ctx());
    expect(readdirSync(paths.qemu.basesDir)).toHaveLength(0);
  });

  it("undoes a failed fork: the source's disk is unfrozen", async () => {
    const driver = newDriver();
    await stoppedInstance("solo");
    await stoppedInstance("taken");
    const before = readFileSync(paths.qemu.diskFile("solo"));
    const c = ctx();
    await expect(
      driver.fork({ source_id: "solo", target: spec("taken"), target_state: "Stopped" }, c),
    ).rejects.toMatchObject({ code: "conflict" });
    expect(c.recorded).toEqual(["freeze-disk"]);
    expect(readFileSync(paths.qemu.diskFile("solo")).equals(before)).toBe(true);
    expect(readdirSync(paths.qemu.basesDir)).toHaveLength(0);
    expect(await driver.get("taken")).toMatchObject({ state: "Stopped" });
    await driver.delete("solo", ctx());
    await driver.delete("taken", ctx());
  });

  it("rolls back a restore killed before its QEMU was recorded: that QEMU goes, Standby stays", async () => {
    const driver = newDriver();
    await stoppedInstance("unrec");
    const store = new QemuStore(paths.qemu);
    const read = await store.read("unrec");
    if (read.kind !== "ok") throw new Error("seed failed");
    // A Standby snapshot (its contents do not matter: it is never loaded here)…
    await writeFile(paths.qemu.devStateFile("unrec"), "device state");
    await store.write({
      ...read.record,
      observed: { id: "unrec", state: "Standby", has_snapshot: true },
    });
    // …and the QEMU an agent killed mid-restore left waiting for it: no pid file, no pid on
    // record. Nothing boots: -S with an incoming migration that never starts.
    const vm = await launchQemu(
      testMachine(
        assets,
        {
          memFile: paths.qemu.memFile("unrec"),
          qmpSocket: paths.qemu.qmpSocket("unrec"),
          ctlSocket: paths.qemu.ctlSocket("unrec"),
          serialLog: paths.qemu.serialLog("unrec"),
          qemuLog: paths.qemu.qemuLog("unrec"),
        },
        { extraArgs: ["-S", "-incoming", "defer"] },
      ),
    );
    await vm.qmp.close(); // QMP serves one client at a time: the driver's turn
    try {
      const observed = await driver.rollback(
        { kind: "restore", instance_id: "unrec" },
        { commandId: "cmd-killed", steps: [] },
      );
      expect(observed).toEqual([
        expect.objectContaining({ id: "unrec", state: "Standby", has_snapshot: true }),
      ]);
      const gone = await Promise.race([vm.exited, sleep(5_000, "still running" as const)]);
      expect(gone).toMatchObject({ signal: "SIGKILL" });
      expect(existsSync(paths.qemu.devStateFile("unrec"))).toBe(true);
    } finally {
      killProcess(vm.pid);
    }
    await driver.delete("unrec", ctx());
  });

  it("reports a recorded Running guest whose QEMU is gone as Stopped, with a reason", async () => {
    const driver = newDriver();
    await stoppedInstance("ghost");
    const store = new QemuStore(paths.qemu);
    const read = await store.read("ghost");
    if (read.kind !== "ok") throw new Error("seed failed");
    const events: ObservedInstance[] = [];
    driver.onEvent((e) => events.push(e));
    // Our own pid: alive, but not a QEMU with this instance's QMP socket.
    await store.write({
      ...read.record,
      pid: process.pid,
      observed: { id: "ghost", state: "Running", has_snapshot: false },
    });
    const seen = await driver.get("ghost");
    expect(seen).toMatchObject({ state: "Stopped", exit_code: null });
    expect(seen?.exit_message).toMatch(/^hypervisor exited unexpectedly/);
    expect(events).toEqual([expect.objectContaining({ id: "ghost", state: "Stopped" })]);
    await driver.delete("ghost", ctx());
  });
});

function readPid(id: string): string {
  return readFileSync(paths.qemu.pidFile(id), "utf8").trim();
}
