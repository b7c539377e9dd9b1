// disk_io_bps with a real guest (QEMU 7.2 TCG): QEMU's block throttling on the guest's disks,
// measured by the guest itself with direct I/O (no page cache between it and the disk), reading
// the image's disk and writing a file on its own, then reading its volume's disk and writing a
// file there. One guest, booted once.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ensureTestImage } from "../../../../scripts/oci-image.ts";
import { ensureVmAssets } from "../../../../scripts/vm-assets.ts";
import { waitFor } from "../../../testing/index.ts";
import { killGuestsUnder, testGuestSpec } from "../../../testing/qemu.ts";
import { ImageStore } from "../../images/store.ts";
import { agentPaths } from "../../paths.ts";
import { VolumeStore } from "../../volumes.ts";
import { QemuDriver } from "./qemu-driver.ts";

/** The limit set, bytes/s, and what each direction moves: about 4 s at the limit (8 MiB). */
const LIMIT = 2_000_000;
const BLOCKS = 128;
const BLOCK = 64 * 1024;

// The guest times each direction with /proc/uptime (centiseconds) and counts what its disk
// moved in /sys/block/*/stat (sectors read, field 3; written, field 7): the limit is on every byte
// the disk moves, the file system's own writes included. Disks are found by their serials, as
// /init finds them.
const PROGRAM = [
  'dev() { for b in /sys/block/vd*; do [ "$(cat $b/serial)" = $1 ] && basename $b; done; }',
  "root=$(dev offshoot-root); rw=$(dev offshoot-rw)",
  "up() { cut -d' ' -f1 /proc/uptime; }",
  "sectors() { awk -v f=$2 '{ print $f }' /sys/block/$1/stat; }",
  `t0=$(up); s0=$(sectors $root 3); dd if=/dev/$root of=/dev/null bs=${BLOCK} count=${BLOCKS} iflag=direct 2>/dev/null; t1=$(up); s1=$(sectors $root 3)`,
  'echo "DISKIO read $t0 $t1 $((s1 - s0))"',
  `t0=$(up); s0=$(sectors $rw 7); dd if=/dev/zero of=/root/w bs=${BLOCK} count=${BLOCKS} oflag=direct conv=fsync 2>/dev/null; t1=$(up); s1=$(sectors $rw 7)`,
  'echo "DISKIO write $t0 $t1 $((s1 - s0))"',
  "vol=$(dev offshoot-vol0)",
  `t0=$(up); s0=$(sectors $vol 3); dd if=/dev/$vol of=/dev/null bs=${BLOCK} count=${BLOCKS} iflag=direct 2>/dev/null; t1=$(up); s1=$(sectors $vol 3)`,
  'echo "DISKIO volread $t0 $t1 $((s1 - s0))"',
  `t0=$(up); s0=$(sectors $vol 7); dd if=/dev/zero of=/vol/w bs=${BLOCK} count=${BLOCKS} oflag=direct conv=fsync 2>/dev/null; t1=$(up); s1=$(sectors $vol 7)`,
  'echo "DISKIO volwrite $t0 $t1 $((s1 - s0))"',
  "exec /usr/bin/count",
].join("\n");

describe("disk_io_bps", () => {
  const root = mkdtempSync(path.join(os.tmpdir(), "odio-"));
  const paths = agentPaths(root);
  let driver: QemuDriver | undefined;

  beforeAll(async () => {
    const assets = await ensureVmAssets();
    // ext4: the test image's erofs rootfs (1.9 MiB) is smaller than a read must move to outlast
    // QEMU's burst allowance; its ext4 one has 20 MiB.
    const images = new ImageStore(paths.imagesDir, "ext4");
    await images.import(ensureTestImage());
    const volumes = new VolumeStore(paths.volumesDir);
    await volumes.create("dio", 64 * 1024 * 1024);
    driver = new QemuDriver(paths, {
      assets,
      accel: "tcg",
      images,
      volumes,
      bootTimeoutMs: 120_000,
    });
  }, 5 * 60_000);

  afterAll(async () => {
    await driver?.close();
    await killGuestsUnder(root);
    rmSync(root, { recursive: true, force: true });
  }, 60_000);

  it(
    "holds a guest's direct reads and writes within ±20 % of the limit",
    async () => {
      const spec = testGuestSpec(
        "dio1",
        {
          disk_io_bps: LIMIT,
          cmd: ["sh", "-c", PROGRAM],
          volumes: [{ volume_id: "vol-dio", mount_path: "/vol", key: "dio" }],
        },
        "02:00:00:00:0d:01",
      );
      await driver?.create(spec, { commandId: "dio-1", steps: { record: async () => {} } });
      const rates = await waitFor(
        "the guest to time its reads and writes",
        () => {
          const log = readFileSync(paths.qemu.serialLog("dio1"), "utf8");
          const seen = [...log.matchAll(/DISKIO (\w+) ([\d.]+) ([\d.]+) (\d+)/g)];
          if (seen.length < 4) return undefined;
          // What the disk moved (512-byte sectors), as the comment above says: a write's file
          // system adds its journal and allocation writes, which the limit counts too.
          return Object.fromEntries(
            seen.map((m) => [m[1], (Number(m[4]) * 512) / (Number(m[3]) - Number(m[2]))]),
          );
        },
        120_000,
        200,
      );
      console.log("disk rates (bytes/s):", JSON.stringify(rates));
      expect(rates.read).toBeGreaterThan(LIMIT * 0.8);
      expect(rates.read).toBeLessThan(LIMIT * 1.2);
      expect(rates.write).toBeGreaterThan(LIMIT * 0.8);
      expect(rates.write).toBeLessThan(LIMIT * 1.2);
      // The volume's disk is held to the same limit.
      expect(rates.volread).toBeGreaterThan(LIMIT * 0.8);
      expect(rates.volread).toBeLessThan(LIMIT * 1.2);
      expect(rates.volwrite).toBeGreaterThan(LIMIT * 0.8);
      expect(rates.volwrite).toBeLessThan(LIMIT * 1.2);
    },
    5 * 60_000,
  );
});
