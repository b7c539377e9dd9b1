// Snapshot memory compression by Debian's zstd and lz4 programs (packages zstd, lz4): a host
// without them does not offer it (capability snapshot_compression).
import { existsSync } from "node:fs";
import { chmod, rename, rm } from "node:fs/promises";
import path from "node:path";
import type { SnapshotCompression } from "@offshoot/shared";
import { execa } from "execa";

/** The compressed file's extension, by algorithm. */
export const COMPRESSED_EXT: Record<SnapshotCompression, string> = { zstd: "zst", lz4: "lz4" };

/** Whether both compressors are on PATH. */
export function compressorsInstalled(): boolean {
  const dirs = (process.env.PATH ?? "/usr/bin:/bin").split(":");
  return ["zstd", "lz4"].every((tool) => dirs.some((d) => existsSync(path.join(d, tool))));
}

/** Compresses `from` into `to`, which appears only once whole (written as `to.part`). */
export async function compressFile(
  algorithm: SnapshotCompression,
  level: number,
  from: string,
  to: string,
): Promise<void> {
  const part = `${to}.part`;
  const args =
    algorithm === "zstd"
      ? ["-q", `-${level}`, "-f", "-o", part, from]
      : ["-q", `-${level}`, "-f", from, part];
  await written(part, to, () => execa(algorithm, args));
}

/** Decompresses `from` into `to` (once whole); zero pages come back as holes (--sparse), as a
 * guest's untouched pages were. */
export async function decompressFile(
  algorithm: SnapshotCompression,
  from: string,
  to: string,
  mode?: number,
): Promise<void> {
  const part = `${to}.part`;
  const args =
    algorithm === "zstd"
      ? ["-d", "-q", "-f", "--sparse", "-o", part, from]
      : ["-d", "-q", "-f", "--sparse", from, part];
  await written(part, to, async () => {
    await execa(algorithm, args);
    if (mode !== undefined) await chmod(part, mode);
  });
}

async function written(part: string, to: string, make: () => Promise<unknown>): Promise<void> {
  await rm(part, { force: true });
  try {
    await make();
    await rename(part, to);
  } catch (e) {
    await rm(part, { force: true });
    throw e;
  }
}
