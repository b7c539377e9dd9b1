// A throwaway XFS with reflink=1 on a loop device, for tests and benchmarks of the reflink path:
// the root filesystem here is ext4, which has no reflinks (FACTS.md), so the driver's
// `cp --reflink=always` only succeeds on a filesystem made for it. Needs root.
//
//   import { mountXfsLoop } from "./scripts/xfs-loop.ts";
//   const xfs = await mountXfsLoop({ sizeBytes: 8 * 2 ** 30 });
//   try { … use xfs.dir … } finally { await xfs.cleanup(); }
//
// The backing file is sparse: it takes only what is written to the filesystem. Whoever uses the
// mount must end the processes that hold files in it before cleanup() (QEMU guests, above all);
// cleanup() falls back to a lazy unmount so that a leftover holder cannot leave the mount behind.
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, open, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { execa } from "execa";

const MKFS_XFS = "/usr/sbin/mkfs.xfs";
const APT_ENV = { DEBIAN_FRONTEND: "noninteractive" };

export interface XfsLoop {
  /** The mounted filesystem's root. */
  readonly dir: string;
  /** The loop device it is mounted from, e.g. /dev/loop3. */
  readonly device: string;
  /** Unmounts, detaches the loop device and removes the backing file. Safe to call twice. */
  cleanup(): Promise<void>;
}

export interface XfsLoopOptions {
  /** Size of the filesystem (the backing file is sparse). Default 8 GiB. */
  sizeBytes?: number;
  /** Where the backing file and mount point go (a new directory inside). Default os.tmpdir(). */
  parent?: string;
}

/** Installs Debian's xfsprogs when mkfs.xfs is missing. scripts/vm-assets.ts lists it too, but
 * only installs packages when it rebuilds its cache, so a machine with a warm cache may lack it. */
export async function ensureXfsprogs(): Promise<void> {
  if (existsSync(MKFS_XFS)) return;
  const install = () =>
    execa("apt-get", ["install", "-y", "-q", "--no-install-recommends", "xfsprogs"], {
      env: APT_ENV,
      reject: false,
    });
  let r = await install();
  if (r.exitCode !== 0) {
    // A fresh machine has no package lists yet.
    await execa("apt-get", ["update", "-q"], { env: APT_ENV });
    r = await install();
  }
  if (r.exitCode !== 0 || !existsSync(MKFS_XFS)) {
    throw new Error(`cannot install xfsprogs (apt-get exited ${r.exitCode}): ${r.stderr}`);
  }
}

/** Makes a sparse file, formats it XFS with reflink=1, and mounts it through a loop device. */
export async function mountXfsLoop(opts: XfsLoopOptions = {}): Promise<XfsLoop> {
  await ensureXfsprogs();
  const base = await mkdtemp(path.join(opts.parent ?? os.tmpdir(), "oxfs-"));
  const image = path.join(base, "xfs.img");
  const dir = path.join(base, "mnt");
  let device = "";
  let mounted = false;
  let done = false;

  const cleanup = async () => {
    if (done) return;
    done = true;
    const errors: unknown[] = [];
    if (mounted) {
      try {
        await unmount(dir);
      } catch (e) {
        errors.push(e);
      }
    }
    if (device) {
      // After a lazy unmount the device may still be busy: -d then detaches it once released.
      const r = await execa("losetup", ["-d", device], { reject: false });
      if (r.exitCode !== 0 && !/No such device/.test(r.stderr)) {
        errors.push(new Error(`losetup -d ${device}: ${r.stderr}`));
      }
    }
    try {
      await rm(base, { recursive: true, force: true });
    } catch (e) {
      errors.push(e);
    }
    if (errors.length > 0) throw new AggregateError(errors, `cleaning up the XFS at ${dir}`);
  };

  try {
    const f = await open(image, "w");
    try {
      await f.truncate(opts.sizeBytes ?? 8 * 2 ** 30);
    } finally {
      await f.close();
    }
    await execa(MKFS_XFS, ["-q", "-m", "reflink=1", image]);
    device = (await execa("losetup", ["--find", "--show", image])).stdout.trim();
    await mkdir(dir);
    await execa("mount", ["-t", "xfs", device, dir]);
    mounted = true;
  } catch (e) {
    await cleanup().catch(() => {});
    throw e;
  }
  return { dir, device, cleanup };
}

/** umount, retried while something still lets go of the filesystem; lazy as the last resort. */
async function unmount(dir: string): Promise<void> {
  let last = "";
  for (let i = 0; i < 10; i++) {
    const r = await execa("umount", [dir], { reject: false });
    if (r.exitCode === 0) return;
    last = r.stderr;
    if (!/busy/i.test(last)) break;
    await sleep(200);
  }
  const lazy = await execa("umount", ["-l", dir], { reject: false });
  if (lazy.exitCode !== 0) throw new Error(`umount ${dir}: ${last}; umount -l: ${lazy.stderr}`);
}
