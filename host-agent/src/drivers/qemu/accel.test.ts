import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ensureVmAssets, type VmAssets } from "../../../../scripts/vm-assets.ts";
import { clearAccelCache, resolveAccel } from "./accel.ts";

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

  // These machines' /dev/kvm is PVM: a stock kernel never reaches /init under it (FACTS.md).
  it("auto resolves to tcg on this machine, within its test-boot budget, and caches it", async () => {
    const timeoutMs = 8_000;
    const started = Date.now();
    const d = await resolveAccel("auto", { assets, workDir, timeoutMs });
    const took = Date.now() - started;
    console.log(`accel auto: ${JSON.stringify(d)}`);
    expect(d.accel).toBe("tcg");
    expect(d.reason).toMatch(
      existsSync("/dev/kvm") ? /test boot under KVM failed/ : /\/dev\/kvm does not exist/,
    );
    // Launch + bounded wait + kill: the budget bounds it (the margin is for a loaded machine;
    // an unbounded test boot would never end).
    expect(took).toBeLessThan(timeoutMs + 20_000);
    // The test boot cleaned up after itself.
    expect(readdirSync(workDir)).toEqual([]);

    // Cached: the very same decision, no second test boot.
    expect(await resolveAccel("auto", { assets, workDir, timeoutMs })).toBe(d);
    expect(readdirSync(workDir)).toEqual([]);
  }, 60_000);

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
