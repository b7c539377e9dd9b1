import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ensureTestImage } from "../../../scripts/oci-image.ts";
import { ensureVmAssets } from "../../../scripts/vm-assets.ts";
import { killGuestsUnder, testGuestSpec } from "../../testing/qemu.ts";
import { ImageStore } from "../images/store.ts";
import { agentPaths } from "../paths.ts";
import { QemuDriver } from "../drivers/qemu/qemu-driver.ts";

describe("ga", () => {
  const root = mkdtempSync(path.join(os.tmpdir(), "oga-"));
  const paths = agentPaths(root);
  let driver: QemuDriver | undefined;
  beforeAll(async () => {
    const assets = await ensureVmAssets();
    const images = new ImageStore(paths.imagesDir);
    await images.import(ensureTestImage());
    driver = new QemuDriver(paths, { assets, accel: "tcg", images, bootTimeoutMs: 120_000 });
  }, 5 * 60_000);
  afterAll(async () => {
    await driver?.close();
    await killGuestsUnder(root);
    rmSync(root, { recursive: true, force: true });
  }, 60_000);
  it("early", async () => {
    const ctx = (c: string) => ({ commandId: c, steps: { record: async () => {} } });
    const spec = testGuestSpec("ga2", {}, "02:00:00:00:0e:02");
    const created = driver!.create(spec, ctx("e1"));
    const { existsSync } = await import("node:fs");
    while (!existsSync(paths.qemu.agentSocket("ga2"))) await new Promise((r) => setTimeout(r, 20));
    const { GuestLink } = await import("./link.ts");
    const t = Date.now();
    const link = new GuestLink(paths.qemu.agentSocket("ga2"), 60_000);
    try { await link.ready; console.log("early ok", Date.now() - t); } catch (e) { console.log("early fail", String(e)); }
    await created;
    console.log("created at", Date.now() - t);
  }, 300_000);
});
