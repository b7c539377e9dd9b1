// Real guests: Debian's cloud kernel under QEMU 7.2 TCG, `-machine microvm`, RAM in a file.
import { execFile } from "node:child_process";
import { statSync } from "node:fs";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import { ensureVmAssets, type VmAssets } from "../../../../scripts/vm-assets.ts";
import {
  cleanupGuests,
  exitSignal,
  type GuestDir,
  guestDir,
  rssKiB,
} from "../../../testing/qemu.ts";
import { guestControl } from "./control.ts";
import { type LaunchedQemu, launchQemu, processAlive, type QemuExit } from "./launch.ts";
import { counts, initEvents, waitForSerial } from "./serial.ts";

// The first run installs packages and downloads the kernel.
const ASSETS_TIMEOUT = 5 * 60_000;
const BOOT_TIMEOUT = 60_000;

let assets: VmAssets;
beforeAll(async () => {
  const started = Date.now();
  assets = await ensureVmAssets();
  console.log(`ensureVmAssets: ${Date.now() - started} ms`);
}, ASSETS_TIMEOUT);

const vms: LaunchedQemu[] = [];
const dirs: GuestDir[] = [];
afterEach(() => cleanupGuests(vms, dirs));

function newDir(): GuestDir {
  const d = guestDir(assets);
  dirs.push(d);
  return d;
}

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

describe("launchQemu (TCG, microvm)", () => {
  it(
    "boots a counting guest, answers QMP, and quits",
    async () => {
      const d = newDir();
      const spec = d.spec();
      const started = Date.now();
      const vm = await launchQemu(spec);
      vms.push(vm);
      const signal = exitSignal(vm);
      const readyMs = await waitForSerial(
        vm.serialLog,
        (log) =>
          initEvents(log).some((e) => e.event === "ready") ? Date.now() - started : undefined,
        { timeoutMs: BOOT_TIMEOUT, signal },
      );
      const seen = await waitForSerial(
        vm.serialLog,
        (log) => (counts(log).length >= 3 ? counts(log) : undefined),
        { timeoutMs: 15_000, signal },
      );
      expect(seen[0]).toBe(0);
      for (let i = 1; i < seen.length; i++) expect(seen[i]).toBe((seen[i - 1] ?? 0) + 1);

      const status = await vm.qmp.execute<{ status: string; running: boolean }>("query-status");
      expect(status).toMatchObject({ status: "running", running: true });
      // The control channel answers; this guest has no NIC, so a MAC query is refused.
      expect(await guestControl(spec.ctlSocket, "ping")).toBe("pong");
      expect(await guestControl(spec.ctlSocket, "query mac")).toBe("err query mac");
      // The guest's RAM is the shared file the fork design maps.
      expect(statSync(spec.memFile).size).toBe(256 * 1024 * 1024);
      const rss = rssKiB(vm.pid);
      console.log(
        `boot to ready marker: ${readyMs} ms; QEMU RSS ${Math.round((rss ?? 0) / 1024)} MiB\n` +
          `qemu ${vm.args.map((a) => (/[\s"]/.test(a) ? JSON.stringify(a) : a)).join(" ")}`,
      );

      await vm.qmp.execute("quit");
      const exit = await within(vm.exited, 10_000, "QEMU exit after quit");
      expect(exit).toEqual<QemuExit>({ exitCode: 0, signal: undefined });
      expect(processAlive(vm.pid)).toBe(false);
    },
    BOOT_TIMEOUT + 30_000,
  );

  it(
    "reports the guest program's exit code and ends QEMU by itself",
    async () => {
      const d = newDir();
      const vm = await launchQemu(d.spec({ command: "echo hello from the guest; exit 3" }));
      vms.push(vm);
      const exit = await within(vm.exited, BOOT_TIMEOUT, "QEMU exit after the guest powered off");
      expect(exit.exitCode).toBe(0);
      const log = await waitForSerial(vm.serialLog, (l) => l, { timeoutMs: 1_000 });
      expect(initEvents(log)).toEqual([{ event: "ready" }, { event: "exit", code: 3 }]);
      expect(log).toContain("hello from the guest");
      expect(counts(log)).toEqual([]);
    },
    BOOT_TIMEOUT + 30_000,
  );

  it("fails with QEMU's own message when QEMU refuses its arguments", async () => {
    const d = newDir();
    const err = await launchQemu(d.spec({ extraArgs: ["-device", "no-such-device"] })).catch(
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toMatch(/no-such-device/);
  });
});

// A process with nothing else pending ends (exit code 0) while it awaits an unref'd child's
// exit — as an agent did, 1 start in 20, when its KVM test boot aborted before its socket was
// open. holdingOpen keeps it alive for the wait; a bare await does not (the control case).
describe("holdingOpen", () => {
  const run = (wait: "holdingOpen" | "await") =>
    new Promise<{ code: number | null; stdout: string }>((resolve) => {
      const script = `
        import { holdingOpen } from ${JSON.stringify(new URL("./launch.ts", import.meta.url).pathname)};
        const p = new Promise((r) => setTimeout(r, 200).unref());
        ${wait === "holdingOpen" ? "await holdingOpen(p);" : "await p.then(() => {});"}
        console.log("after the wait");
      `;
      execFile(
        process.execPath,
        ["--import", "tsx", "--input-type=module", "-e", script],
        { encoding: "utf8" },
        (err, stdout) => resolve({ code: err ? Number(err.code) : 0, stdout }),
      );
    });

  it("keeps a process alive while it waits on something that holds nothing open", async () => {
    expect(await run("holdingOpen")).toEqual({ code: 0, stdout: "after the wait\n" });
    // Without it the process is gone before the wait ends (13: a top-level await never settled).
    expect((await run("await")).stdout).toBe("");
  });
});
