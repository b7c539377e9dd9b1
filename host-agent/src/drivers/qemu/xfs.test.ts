// The QEMU driver's reflink path with a real guest (QEMU 7.2 TCG): its data dir on an XFS made with
// reflink=1 on a loop device (the root filesystem here is ext4, where forks get qcow2 overlays on
// a frozen base instead). One guest and one fork, to keep CI's two cores free for the rest.
import { execFileSync } from "node:child_process";
import { existsSync, readdirSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ensureTestImage } from "../../../../scripts/oci-image.ts";
import { ensureVmAssets, type VmAssets } from "../../../../scripts/vm-assets.ts";
import { mountXfsLoop, type XfsLoop } from "../../../../scripts/xfs-loop.ts";
import { waitFor } from "../../../testing/index.ts";
import {
  killGuestsUnder,
  serialCounts as serialCountsOf,
  testGuestSpec,
} from "../../../testing/qemu.ts";
import { ImageStore } from "../../images/store.ts";
import { type AgentPaths, agentPaths } from "../../paths.ts";
import type { OpContext } from "../driver.ts";
import { backingChain } from "./disks.ts";
import { QemuDriver } from "./qemu-driver.ts";

let assets: VmAssets;
let xfs: XfsLoop | undefined;
let paths: AgentPaths;
let images: ImageStore;
let driver: QemuDriver | undefined;

beforeAll(async () => {
  assets = await ensureVmAssets();
  xfs = await mountXfsLoop({ sizeBytes: 4 * 1024 ** 3 });
  paths = agentPaths(xfs.dir);
  images = new ImageStore(paths.imagesDir);
  await images.import(ensureTestImage());
}, 5 * 60_000);

// Runs whether the test passed or not: no guest, mount or loop device may outlive it.
afterAll(async () => {
  await driver?.close();
  if (xfs) {
    await killGuestsUnder(xfs.dir);
    await xfs.cleanup();
  }
}, 60_000);

let seq = 0;
const ctx = (): OpContext => ({ commandId: `xfs-${++seq}`, steps: { record: async () => {} } });

const spec = (id: string, mac: string) => testGuestSpec(id, {}, mac);
const serialCounts = (id: string) => serialCountsOf(paths, id);

/** Extents of `file` that FIEMAP reports as shared with another file. */
function sharedExtents(file: string): number {
  const out = execFileSync("filefrag", ["-v", file]).toString();
  return out.split("\n").filter((l) => /\bshared\b/.test(l)).length;
}

describe("QemuDriver on XFS with reflink", () => {
  it("forks a Standby guest with a reflinked disk and the shared memory base; the fork continues and outlives its source", async () => {
    const dir = xfs?.dir ?? "";
    expect(execFileSync("findmnt", ["-n", "-o", "FSTYPE", "-T", dir]).toString().trim()).toBe(
      "xfs",
    );
    driver = new QemuDriver(paths, { assets, accel: "tcg", images, bootTimeoutMs: 60_000 });

    await driver.create(spec("xsrc", "02:00:00:00:0c:01"), ctx());
    await waitFor(
      "source counts",
      () => (serialCounts("xsrc").length >= 3 ? true : undefined),
      30_000,
      100,
    );
    expect(await driver.standby("xsrc", ctx())).toMatchObject({ state: "Standby" });
    const last = serialCounts("xsrc").at(-1) ?? -1;
    expect(last).toBeGreaterThanOrEqual(2);

    const [, fork] = await driver.fork(
      { source_id: "xsrc", target: spec("xfork", "02:00:00:00:0c:02"), target_state: "Running" },
      ctx(),
    );
    expect(fork).toMatchObject({ id: "xfork", state: "Running" });
    // The disk is a reflink clone: a flat qcow2 of its own (no frozen base, no longer chain)
    // whose blocks are shared with the source's — not a copy that happened to succeed.
    expect(driver.lastDiskClone).toBe("reflink");
    const bases = existsSync(paths.qemu.basesDir) ? readdirSync(paths.qemu.basesDir) : [];
    expect(bases).toEqual([]);
    const chain = await backingChain(paths.qemu.diskFile("xfork"));
    expect(chain).toHaveLength(2); // the fork's disk → the blank ext4 template
    expect(sharedExtents(paths.qemu.diskFile("xfork"))).toBeGreaterThan(0);
    // Memory is never copied: both map the one frozen RAM file.
    expect(driver.lastCopyPath).toBe("frozen-base");

    // The fork resumes the source's memory: its first count is the one after the source's last.
    const forkCounts = await waitFor(
      "fork counts",
      () => {
        const c = serialCounts("xfork");
        return c.length >= 2 ? c : undefined;
      },
      15_000,
      100,
    );
    expect(forkCounts[0]).toBe(last + 1);

    // Without its source (RAM file and disk gone) the fork keeps running on its own blocks.
    await driver.delete("xsrc", ctx());
    expect(existsSync(paths.qemu.instanceDir("xsrc"))).toBe(false);
    const n = serialCounts("xfork").length;
    const more = await waitFor(
      "fork still counting",
      () => {
        const c = serialCounts("xfork");
        return c.length >= n + 2 ? c : undefined;
      },
      15_000,
      100,
    );
    expect(more.at(-1)).toBe((forkCounts[0] ?? 0) + more.length - 1);
    expect(await driver.get("xfork")).toMatchObject({ state: "Running" });

    await driver.delete("xfork", ctx());
    expect(await driver.get("xfork")).toBeNull();
  }, 180_000);
});
