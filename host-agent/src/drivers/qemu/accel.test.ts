import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ensureVmAssets, type VmAssets } from "../../../../scripts/vm-assets.ts";
import { clearAccelCache, resolveAccel } from "./accel.ts";
import { killProcess, launchQemu } from "./launch.ts";
import { initEvents, waitForSerial } from "./serial.ts";

let assets: VmAssets;
let workDir: string;
beforeAll(async () => {
  assets = await ensureVmAssets();
  workDir = mkdtempSync(path.join(os.tmpdir(), "oa-"));
}, 5 * 60_000);
afterAll(() => {
  clearAccelCache();
  rmSync(workDir, { recursive: true, force: true });
});

describe("resolveAccel", () => {
  it("honours an explicit kvm or tcg without a test boot", async () => {
    const tcg = await resolveAccel("tcg", { assets, workDir });
    const kvm = await resolveAccel("kvm", { assets, workDir });
    expect([tcg.accel, kvm.accel]).toEqual(["tcg", "kvm"]);
    // Decided from the setting alone: no test boot ran, and none left files behind.
    expect([tcg.reason, kvm.reason]).toEqual(["configured", "configured"]);
    expect(readdirSync(workDir)).toEqual([]);
  });

  it("auto without a KVM device is tcg", async () => {
    const d = await resolveAccel("auto", { assets, workDir, kvmDevice: "/nonexistent/kvm" });
    expect(d).toMatchObject({ accel: "tcg", mode: "auto" });
    expect(d.reason).toMatch(/does not exist/);
  });

  // Holds on any host: where /dev/kvm is usable the test boot decides, and whatever it decided
  // must boot a guest to /init (these machines' KVM is PVM, so TCG here; a bare-metal host KVM).
  it("auto decides by its test boot, within budget, caches it, and the decision boots", async () => {
    const timeoutMs = 8_000;
    const started = Date.now();
    const d = await resolveAccel("auto", { assets, workDir, timeoutMs });
    const took = Date.now() - started;
    console.log(`accel auto: ${JSON.stringify(d)}`);
    if (!existsSync("/dev/kvm")) {
      expect(d).toMatchObject({ accel: "tcg", reason: "/dev/kvm does not exist" });
    } else if (d.reason.includes("is not usable")) {
      expect(d.accel).toBe("tcg");
    } else {
      expect(d.reason).toMatch(
        d.accel === "kvm"
          ? /^test boot under KVM reached \/init in \d+ ms$/
          : /^test boot under KVM failed: /,
      );
    }
    // Launch + bounded wait + kill: the budget bounds it (the margin is for a loaded machine;
    // an unbounded test boot would never end).
    expect(took).toBeLessThan(timeoutMs + 20_000);
    // The test boot cleaned up after itself.
    expect(readdirSync(workDir)).toEqual([]);

    // Cached: the very same decision, no second test boot.
    expect(await resolveAccel("auto", { assets, workDir, timeoutMs })).toBe(d);
    expect(readdirSync(workDir)).toEqual([]);

    // The decision is usable: a guest boots to /init with it.
    const dir = mkdtempSync(path.join(workDir, "boot-"));
    const vm = await launchQemu({
      qemu: assets.qemu,
      kernel: assets.kernelElf,
      initramfs: assets.initramfs,
      accel: d.accel,
      memoryMiB: 128,
      vcpus: 1,
      memFile: path.join(dir, "mem"),
      qmpSocket: path.join(dir, "q.sock"),
      ctlSocket: path.join(dir, "c.sock"),
      serialLog: path.join(dir, "serial.log"),
      qemuLog: path.join(dir, "qemu.log"),
      command: "exit 0",
    });
    try {
      await vm.qmp.close();
      await waitForSerial(
        vm.serialLog,
        (log) => (initEvents(log).some((e) => e.event === "ready") ? true : undefined),
        { timeoutMs: 60_000 },
      );
    } finally {
      killProcess(vm.pid);
      await vm.exited;
      rmSync(dir, { recursive: true, force: true });
    }
  }, 90_000);

  // A fresh data dir has no accel/ yet: the probe makes its own directory.
  it("creates a missing work dir, and any failure to probe means tcg with the reason", async () => {
    clearAccelCache();
    const qemu = fakeKvmQemu("-no-such-option");
    const fresh = path.join(workDir, "not", "yet", "there");
    const d = await resolveAccel("auto", {
      assets: { ...assets, qemu },
      workDir: fresh,
      timeoutMs: 20_000,
      kvmDevice: qemu,
    });
    expect(d.accel).toBe("tcg");
    expect(d.reason).toMatch(/no-such-option/);
    expect(readdirSync(fresh)).toEqual([]);

    // A work dir that cannot be made (its parent is a file): still a decision, never a throw.
    const file = path.join(workDir, "a-file");
    writeFileSync(file, "");
    clearAccelCache();
    const blocked = await resolveAccel("auto", {
      assets: { ...assets, qemu },
      workDir: path.join(file, "accel"),
      kvmDevice: qemu,
    });
    expect(blocked.accel).toBe("tcg");
    expect(blocked.reason).toMatch(/^test boot under KVM failed: .*ENOTDIR/);
    rmSync(file);
    clearAccelCache();
  });

  // The test boot's two failure paths, whatever this host's KVM is: a stand-in QEMU that runs the
  // probe under TCG, either paused (-S: /init never comes, like a kernel hanging under PVM) or
  // refusing to start (like a host whose KVM cannot create a VM).
  function fakeKvmQemu(extra: string): string {
    const file = path.join(workDir, `qemu-${extra.replace(/\W/g, "") || "x"}.sh`);
    // -cpu host needs KVM: the stand-in swaps it for max along with the accelerator.
    const script = [
      "#!/bin/bash",
      `args=("\${@/#kvm/tcg}")`,
      `args=("\${args[@]/#host/max}")`,
      `exec ${assets.qemu} "\${args[@]}" ${extra}`,
    ];
    writeFileSync(file, `${script.join("\n")}\n`, { mode: 0o755 });
    return file;
  }

  it("a KVM test boot that never reaches /init is cut off at its timeout and means tcg", async () => {
    const qemu = fakeKvmQemu("-S");
    const timeoutMs = 4_000;
    const started = Date.now();
    const d = await resolveAccel("auto", {
      assets: { ...assets, qemu },
      workDir,
      timeoutMs,
      kvmDevice: qemu, // exists: the test boot runs
    });
    const took = Date.now() - started;
    expect(d.accel).toBe("tcg");
    expect(d.reason).toMatch(/test boot under KVM failed: serial log .* not met within/);
    expect(took).toBeGreaterThanOrEqual(timeoutMs - 500);
    // Cut off, not left to run: the margin is for a loaded machine.
    expect(took).toBeLessThan(timeoutMs + 15_000);
    expect(readdirSync(workDir).filter((f) => f.startsWith("kvm-probe-"))).toEqual([]);
  }, 60_000);

  it("a KVM test boot whose QEMU exits at once means tcg, quickly", async () => {
    const qemu = fakeKvmQemu("-no-such-option");
    const timeoutMs = 30_000;
    const started = Date.now();
    const d = await resolveAccel("auto", {
      assets: { ...assets, qemu },
      workDir,
      timeoutMs,
      kvmDevice: qemu,
    });
    expect(d.accel).toBe("tcg");
    expect(d.reason).toMatch(/no-such-option/);
    // Decided when QEMU exited, not when the test boot's budget ran out.
    expect(Date.now() - started).toBeLessThan(timeoutMs);
  });
});
