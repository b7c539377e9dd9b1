// An image's layers, applied in order with OCI whiteouts, as one read-only file system (ext4, or
// erofs with AGENT_ROOTFS_FORMAT=erofs; BENCHMARKS.md compares them): the lower
// half of every guest's overlayfs (/init mounts it read-only; the instance's disk is the upper).
// Built once per manifest digest and shared by every instance of that image.
import { randomBytes } from "node:crypto";
import { chmod, chown, copyFile, lstat, mkdir, readdir, rename, rm, stat } from "node:fs/promises";
import path from "node:path";
import { InvalidRequestError } from "@offshoot/shared";
import { execa } from "execa";
import type { OciLayer } from "./oci.ts";

const MiB = 1024 * 1024;
/** Directories /init mounts on (and /.offshoot, where it puts its own tools for the program's
 * launch): made in every rootfs so mounting never writes the instance's disk. */
const MOUNT_POINTS = ["proc", "sys", "dev", "tmp", "run", ".offshoot"];

export type RootfsFormat = "ext4" | "erofs";

export async function buildRootfs(
  layers: OciLayer[],
  stage: string,
  out: string,
  format: RootfsFormat = "erofs",
): Promise<number> {
  await rm(stage, { recursive: true, force: true });
  await mkdir(stage, { recursive: true });
  try {
    for (const layer of layers) await applyLayer(layer, stage);
    for (const d of MOUNT_POINTS) await mkdir(path.join(stage, d), { recursive: true });
    const tmp = `${out}.partial`;
    await rm(tmp, { force: true });
    if (format === "erofs") {
      // Uncompressed: the guest reads it as it would ext4, without decompressing.
      await execa("mkfs.erofs", ["--quiet", tmp, stage]);
    } else {
      const { bytes, entries } = await measure(stage);
      // Room for ext4's own metadata; the filesystem is never written after this.
      const size = Math.ceil((bytes * 1.1 + 16 * MiB) / MiB) * MiB;
      await execa("mkfs.ext4", [
        "-q",
        "-F",
        "-L",
        "offshoot-root",
        "-O",
        "^has_journal",
        "-N",
        String(entries + 1024),
        "-E",
        "root_owner=0:0",
        "-d",
        stage,
        tmp,
        `${size / 1024}k`,
      ]);
    }
    await execa("mv", ["-f", tmp, out]);
    return (await stat(out)).size;
  } finally {
    await rm(stage, { recursive: true, force: true });
  }
}

/** A static busybox: the tar that runs confined to a layer's own directory. */
const BUSYBOX = "/bin/busybox";

/**
 * One layer: extracted on its own, confined to a fresh directory (chroot: whatever names,
 * symlinks or hard links the layer holds resolve inside it), then merged into the stage without
 * ever following a symlink — whiteouts first (they hide what lower layers made), then the
 * layer's own entries. A hostile image can shape its own rootfs, never touch the host.
 */
async function applyLayer(layer: OciLayer, stage: string): Promise<void> {
  const dir = `${stage}.layer`;
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir);
  try {
    await extractConfined(layer, dir);
    await merge(dir, stage);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Unpacks a tar (gzip'd, zstd'd or plain) into `dir`, chrooted there: whatever names or links
 * it holds resolve inside `dir`. Throws with tar's complaint when it does not unpack. */
export async function extractConfined(layer: OciLayer, dir: string): Promise<void> {
  const tool = `.offshoot-untar-${randomBytes(6).toString("hex")}`;
  await mkdir(path.join(dir, tool));
  await copyFile(BUSYBOX, path.join(dir, tool, "busybox"));
  await chmod(path.join(dir, tool, "busybox"), 0o755);
  if (layer.compression === "zstd" && (await execa("zstd", ["-V"], { reject: false })).failed) {
    throw new InvalidRequestError("zstd layers need the zstd tool (Debian package zstd)");
  }
  const z = layer.compression === "gzip" ? ["-z"] : [];
  const untar = [dir, `/${tool}/busybox`, "tar", "-x", ...z, "-f", "-"];
  // zstd (the host's, from Debian's zstd) decompresses outside; the tar stays confined.
  const r =
    layer.compression === "zstd"
      ? await execa("zstd", ["-dcq", layer.file], { reject: false }).pipe("chroot", untar, {
          reject: false,
        })
      : await execa("chroot", untar, { inputFile: layer.file, reject: false });
  await rm(path.join(dir, tool), { recursive: true, force: true });
  if (r.exitCode !== 0) {
    throw new InvalidRequestError(`layer ${path.basename(layer.file)} did not unpack: ${r.stderr}`);
  }
}

/** Moves the entries of `from` into `to` (a real directory), applying whiteouts. */
async function merge(from: string, to: string): Promise<void> {
  const names = await readdir(from);
  for (const n of names) {
    if (n === ".wh..wh..opq") {
      for (const c of await readdir(to))
        await rm(path.join(to, c), { recursive: true, force: true });
    } else if (n.startsWith(".wh.")) {
      await rm(path.join(to, n.slice(".wh.".length)), { recursive: true, force: true });
    }
  }
  for (const n of names) {
    if (n.startsWith(".wh.")) continue;
    const src = path.join(from, n);
    const dst = path.join(to, n);
    const s = await lstat(src);
    const d = await lstat(dst).catch(() => undefined);
    if (s.isDirectory() && d?.isDirectory()) {
      await merge(src, dst);
      // The upper layer's directory metadata wins.
      await chown(dst, s.uid, s.gid);
      await chmod(dst, s.mode & 0o7777);
      continue;
    }
    // Replaced whole (rm does not follow a symlink; it removes the link).
    if (d) await rm(dst, { recursive: true, force: true });
    if (s.isDirectory()) await stripWhiteouts(src);
    await rename(src, dst);
  }
}

/** Whiteouts in a directory new to the stage hide nothing; they must not reach the image. */
async function stripWhiteouts(dir: string): Promise<void> {
  for (const e of await readdir(dir, { withFileTypes: true })) {
    if (e.name.startsWith(".wh."))
      await rm(path.join(dir, e.name), { recursive: true, force: true });
    else if (e.isDirectory()) await stripWhiteouts(path.join(dir, e.name));
  }
}

export async function measure(dir: string): Promise<{ bytes: number; entries: number }> {
  let bytes = 0;
  let entries = 0;
  const walk = async (d: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true })) {
      entries++;
      const p = path.join(d, e.name);
      if (e.isDirectory()) {
        bytes += 4096;
        await walk(p);
      } else if (e.isFile()) {
        bytes += Math.ceil((await stat(p)).size / 4096) * 4096;
      } else bytes += 4096;
    }
  };
  await walk(dir);
  return { bytes, entries };
}
