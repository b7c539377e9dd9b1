// Image benchmarks: pulls from a real registry (Debian's docker-registry on loopback) into the
// agent's image store, and boots of real QEMU guests (TCG) from what they built, for each rootfs
// format (ext4, erofs) side by side in one run. `BENCH_ONLY=images npm run bench` for this part.
// Figures are reported, never asserted.
//
// Images: the busybox test image (scripts/oci-image.ts, 2 layers, ~1 MB) and a ~100 MB one: a
// busybox base layer and a layer of the files of a Debian package set (PostgreSQL 15, QEMU,
// skopeo: what this machine has installed), gzip'd. Then "v2" of the big one: the same two
// layers and one small new one, as a newly pushed tag would be.
//
// (1) pull + convert into an empty store (every layer fetched), median of 3, the formats
//     interleaved run by run;
// (2) the v2 tag into a store that holds v1 (the warm host): what is fetched, and the time;
// (3) boot: QemuDriver.create of each image from each format until Running (the guest's init
//     reported ready), median of 3.
import { execFileSync } from "node:child_process";
import { lstatSync, mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import type { OpContext } from "../host-agent/src/drivers/driver.ts";
import { QemuDriver } from "../host-agent/src/drivers/qemu/qemu-driver.ts";
import type { RootfsFormat } from "../host-agent/src/images/rootfs.ts";
import { ImageStore } from "../host-agent/src/images/store.ts";
import { agentPaths } from "../host-agent/src/paths.ts";
import { killGuestsUnder, testGuestSpec } from "../host-agent/testing/qemu.ts";
import { push, startRegistry } from "../host-agent/testing/registry.ts";
import { ensureTestImage } from "../scripts/oci-image.ts";
import { busyboxEntries, file, writeLayout } from "../scripts/oci-layout.ts";
import { ensureVmAssets } from "../scripts/vm-assets.ts";
import { percentile } from "./stats.ts";

const MiB = 1024 * 1024;
const RUNS = 3;
const FORMATS: readonly RootfsFormat[] = ["ext4", "erofs"];
const PACKAGE_SET = [
  "postgresql-15",
  "qemu-system-x86",
  "qemu-system-data",
  "qemu-utils",
  "skopeo",
];

const median = (xs: number[]) => percentile(xs, 50);
const ms = (x: number) => `${Math.round(x)} ms`;
const mb = (b: number) => `${(b / MiB).toFixed(1)} MiB`;

let seq = 0;
const ctx = (): OpContext => ({
  commandId: `bench-images-${++seq}`,
  steps: { record: async () => {} },
});

/** The regular files of the installed packages, as a tar (GNU tar, from /). */
function packageSetTar(): Buffer {
  const files = execFileSync("dpkg", ["-L", ...PACKAGE_SET], { maxBuffer: 1 << 26 })
    .toString()
    .split("\n")
    .filter((f) => f.startsWith("/") && lstatSync(f, { throwIfNoEntry: false })?.isFile());
  return execFileSync(
    "tar",
    ["-C", "/", "-cf", "-", "--no-recursion", ...files.map((f) => f.slice(1))],
    {
      maxBuffer: 1 << 30,
    },
  );
}

export async function runImagesBench(command: string): Promise<string> {
  const assets = await ensureVmAssets();
  const work = mkdtempSync(path.join(os.tmpdir(), "bench-images-"));
  const reg = await startRegistry();
  const log = (m: string) => console.error(`[bench:images] ${m}`);
  const drivers: QemuDriver[] = [];
  try {
    // --- the images -----------------------------------------------------------------------
    const small = `${reg.host}/bench/busybox:v1`;
    await push(ensureTestImage(), small, reg.user);
    const t0 = performance.now();
    const pkgTar = packageSetTar();
    const base = { entries: busyboxEntries() };
    const pkgs = { entries: [], tar: pkgTar };
    const v1 = writeLayout(path.join(work, "big-v1"), {
      layers: [base, pkgs],
      config: { Cmd: ["/usr/bin/count"] },
    });
    const v2 = writeLayout(path.join(work, "big-v2"), {
      layers: [base, pkgs, { entries: [file("etc/app-release", "v2\n")] }],
      config: { Cmd: ["/usr/bin/count"] },
    });
    const big = `${reg.host}/bench/big:v1`;
    const bigNext = `${reg.host}/bench/big:v2`;
    await push(path.join(work, "big-v1"), big, reg.user);
    await push(path.join(work, "big-v2"), bigNext, reg.user);
    const bigBytes = v1.layers.reduce((n, l) => n + l.size, 0);
    const newLayer = v2.layers[2]?.size ?? 0;
    log(
      `images built and pushed in ${ms(performance.now() - t0)}; big: ${mb(bigBytes)} compressed`,
    );

    // Each run measures both formats one after the other, so load drifts hit both alike.
    type Figures = {
      small: number[];
      big: number[];
      warm: number[];
      fetched: number[];
      sizes: [number, number];
    };
    const figures = new Map<RootfsFormat, Figures>(
      FORMATS.map((f) => [f, { small: [], big: [], warm: [], fetched: [], sizes: [0, 0] }]),
    );
    const timed = async (store: ImageStore, ref: string) => {
      const start = performance.now();
      const image = await store.pull(ref);
      return { ms: performance.now() - start, image };
    };
    for (let i = 0; i < RUNS; i++) {
      for (const format of FORMATS) {
        const f = figures.get(format) as Figures;
        const fresh = () =>
          new ImageStore(mkdtempSync(path.join(work, `store-${format}-`)), format);
        const a = await timed(fresh(), small);
        const store = fresh();
        const b = await timed(store, big);
        const before = reg.blobBytesServed();
        const c = await timed(store, bigNext);
        f.fetched.push(reg.blobBytesServed() - before);
        f.small.push(a.ms);
        f.big.push(b.ms);
        f.warm.push(c.ms);
        f.sizes = [a.image.size_bytes, b.image.size_bytes];
        log(`${format} run ${i + 1}: small ${ms(a.ms)}, big ${ms(b.ms)}, v2 on warm ${ms(c.ms)}`);
      }
    }
    const rows = FORMATS.map((format) => {
      const f = figures.get(format) as Figures;
      return `| ${format} | ${ms(median(f.small))} (${mb(f.sizes[0])}) | ${ms(median(f.big))} (${mb(f.sizes[1])}) | ${ms(median(f.warm))} | ${Math.round(median(f.fetched))} B |`;
    });

    // Boots: one data dir per format, both images pulled into its store; runs interleaved.
    const hosts = FORMATS.map((format) => {
      const root = mkdtempSync(path.join(work, `agent-${format}-`));
      const paths = agentPaths(root);
      const images = new ImageStore(paths.imagesDir, format);
      const driver = new QemuDriver(paths, {
        assets,
        accel: "tcg",
        images,
        bootTimeoutMs: 180_000,
      });
      drivers.push(driver);
      return { format, images, driver };
    });
    const bootTimes = new Map<string, number[]>();
    for (const [label, ref] of [
      ["test image", small],
      ["big image", big],
    ] as const) {
      const digests = new Map<RootfsFormat, string>();
      for (const h of hosts) digests.set(h.format, (await h.images.pull(ref)).digest);
      for (let i = 0; i < RUNS; i++) {
        for (const h of hosts) {
          const id = `boot-${h.format}-${label.split(" ")[0]}-${i}`;
          const spec = testGuestSpec(id, {
            image: ref,
            image_digest: digests.get(h.format) ?? null,
            memory_bytes: 256 * MiB,
            cmd: ["sh", "-c", "exec sleep 3600"],
          });
          spec.network.enabled = false;
          const start = performance.now();
          await h.driver.create(spec, ctx());
          const key = `${h.format}|${label}`;
          bootTimes.set(key, [...(bootTimes.get(key) ?? []), performance.now() - start]);
          await h.driver.delete(id, ctx());
        }
      }
    }
    const boots = [...bootTimes].map(([key, times]) => {
      const [format, label] = key.split("|");
      return `| ${format} | ${label} | ${ms(median(times))} | ${times.map(ms).join(", ")} |`;
    });
    return [
      "## Images (pull, convert, boot)",
      "",
      `Command: \`${command}\`, on ${os.cpus().length} cores. A registry on loopback (Debian's docker-registry, token auth); medians of ${RUNS}. The big image: ${mb(bigBytes)} of gzip'd layers (busybox + the files of ${PACKAGE_SET.join(", ")}); its v2 adds one ${newLayer}-byte layer.`,
      "",
      "| rootfs | test image: pull + convert (rootfs size) | big image: pull + convert (rootfs size) | v2 tag on a host holding v1: pull + convert | blob bytes fetched for v2 |",
      "|---|---|---|---|---|",
      ...rows,
      "",
      "Boot: `QemuDriver.create` until Running (TCG, 256 MiB, no network).",
      "",
      "| rootfs | image | median | runs |",
      "|---|---|---|---|",
      ...boots,
    ].join("\n");
  } finally {
    for (const d of drivers) await d.close().catch(() => {});
    await killGuestsUnder(work);
    await reg.stop();
    rmSync(work, { recursive: true, force: true });
  }
}
