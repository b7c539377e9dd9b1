// scripts/vm-assets.ts, checked where its output is used.
import { spawnSync } from "node:child_process";
import { openSync, readSync, statSync } from "node:fs";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import {
  defaultAssetsDir,
  ensureVmAssets,
  type VmAssets,
  vmAssetsModules,
} from "../../../../scripts/vm-assets.ts";

let assets: VmAssets;
beforeAll(async () => {
  assets = await ensureVmAssets();
}, 5 * 60_000);

function head(file: string, n: number): Buffer {
  const buf = Buffer.alloc(n);
  readSync(openSync(file, "r"), buf, 0, n, 0);
  return buf;
}

describe("ensureVmAssets", () => {
  it("returns the same assets when they exist, without building anything again", async () => {
    const files = [
      path.join(defaultAssetsDir(), "assets.json"),
      assets.kernelElf,
      assets.bzImage,
      assets.initramfs,
    ];
    const written = () => files.map((f) => statSync(f).mtimeMs);
    const before = written();
    const again = await ensureVmAssets();
    expect(again).toEqual(assets);
    expect(written()).toEqual(before);
  });

  it("extracts an ELF vmlinux and keeps the bzImage", () => {
    expect(head(assets.kernelElf, 4).toString("latin1")).toBe("\x7fELF");
    // bzImage: "HdrS" boot protocol signature at 0x202.
    expect(head(assets.bzImage, 0x206).subarray(0x202).toString("latin1")).toBe("HdrS");
    expect(assets.kernelVersion).toMatch(/^\d+\.\d+\.\d+-\d+-cloud-amd64$/);
  });

  it("packs busybox, /init and the virtio modules with their dependencies first", () => {
    const listed = spawnSync(
      "sh",
      ["-c", 'gzip -dc "$1" | cpio -t --quiet', "sh", assets.initramfs],
      {
        encoding: "utf8",
      },
    );
    expect(listed.status).toBe(0);
    const files = new Set(listed.stdout.split("\n"));
    for (const f of [
      "init",
      "bin/busybox",
      "bin/sh",
      "bin/insmod",
      "bin/poweroff",
      "etc/offshoot/modules",
    ])
      expect(files).toContain(f);
    const mods = vmAssetsModules();
    expect(mods).toBeDefined();
    const order = mods?.modules ?? [];
    for (const m of ["virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "overlay"]) {
      expect(order.includes(m) || mods?.builtin.includes(m)).toBe(true);
    }
    for (const m of order) expect(files).toContain(`lib/modules/${m}.ko`);
    // Dependencies load first: each of virtio_mmio's is built in, or loaded before it (and a
    // built-in virtio_mmio can only have built-in ones).
    for (const dep of ["virtio_ring", "virtio"]) {
      const before = order.includes(dep) && order.indexOf(dep) < order.indexOf("virtio_mmio");
      expect(mods?.builtin.includes(dep) || before, dep).toBe(true);
    }
  });
});
