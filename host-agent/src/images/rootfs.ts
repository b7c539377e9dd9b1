// An image's layers, applied in order with OCI whiteouts, as one read-only ext4 file: the lower
// half of every guest's overlayfs (/init mounts it read-only; the instance's disk is the upper).
// Built once per manifest digest and shared by every instance of that image.
import { lstat, mkdir, readdir, rm, stat } from "node:fs/promises";
import path from "node:path";
import { InvalidRequestError } from "@offshoot/shared";
import { execa } from "execa";
import type { OciLayer } from "./oci.ts";

const MiB = 1024 * 1024;
/** Directories /init mounts on (and /.offshoot, where it puts its own tools for the program's
 * launch): made in every rootfs so mounting never writes the instance's disk. */
const MOUNT_POINTS = ["proc", "sys", "dev", "tmp", "run", ".offshoot"];

export async function buildRootfs(layers: OciLayer[], stage: string, out: string): Promise<number> {
  await rm(stage, { recursive: true, force: true });
  await mkdir(stage, { recursive: true });
  try {
    for (const layer of layers) await applyLayer(layer, stage);
    for (const d of MOUNT_POINTS) await mkdir(path.join(stage, d), { recursive: true });
    const { bytes, entries } = await measure(stage);
    // Room for ext4's own metadata; the filesystem is never written after this.
    const size = Math.ceil((bytes * 1.1 + 16 * MiB) / MiB) * MiB;
    const tmp = `${out}.partial`;
    await rm(tmp, { force: true });
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
    await execa("mv", ["-f", tmp, out]);
    return size;
  } finally {
    await rm(stage, { recursive: true, force: true });
  }
}

/** Whiteouts first (they hide what lower layers made), then the layer's own files. */
async function applyLayer(layer: OciLayer, stage: string): Promise<void> {
  const z = layer.compression === "gzip" ? ["-z"] : [];
  const listed = await execa("tar", [...z, "-tf", layer.file], { maxBuffer: 256 * MiB });
  const names = listed.stdout.split("\n").filter(Boolean).map(clean);
  const checked = new Set<string>();
  for (const name of names) {
    await refuseSymlinkParents(stage, name, checked);
    const base = path.posix.basename(name);
    const dir = path.posix.dirname(name);
    if (base === ".wh..wh..opq") {
      const target = path.join(stage, dir);
      for (const child of await readdir(target).catch(() => [])) {
        await rm(path.join(target, child), { recursive: true, force: true });
      }
    } else if (base.startsWith(".wh.")) {
      await rm(path.join(stage, dir, base.slice(".wh.".length)), { recursive: true, force: true });
    }
  }
  await execa("tar", [
    ...z,
    "-xf",
    layer.file,
    "-C",
    stage,
    "--numeric-owner",
    "--same-owner",
    "--same-permissions",
    "--exclude=.wh.*",
  ]);
}

function clean(name: string): string {
  const n = path.posix.normalize(name.replace(/^\.?\/+/, "")).replace(/\/$/, "");
  if (n === ".." || n.startsWith("../") || path.posix.isAbsolute(n)) {
    throw new InvalidRequestError(`layer member ${name} points outside the image`);
  }
  return n;
}

/** A member under a symlink an earlier layer made would be written through it, possibly out of
 * the image: such images are refused rather than resolved. */
async function refuseSymlinkParents(stage: string, name: string, checked: Set<string>) {
  const parts = name.split("/").slice(0, -1);
  let rel = "";
  for (const p of parts) {
    rel = rel ? `${rel}/${p}` : p;
    if (checked.has(rel)) continue;
    const st = await lstat(path.join(stage, rel)).catch(() => undefined);
    if (st?.isSymbolicLink()) {
      throw new InvalidRequestError(`layer member ${name} is under the symlink /${rel}`);
    }
    if (st) checked.add(rel);
  }
}

async function measure(dir: string): Promise<{ bytes: number; entries: number }> {
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
