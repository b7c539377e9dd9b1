// Disks and memory files: qcow2 overlays on frozen, read-only bases, so a fork never depends on a
// file its source may still write or remove. Freezing moves an instance's current disk into the
// bases dir (it is never written again) and gives the instance a fresh overlay on it; each fork
// target gets its own overlay on the same base. Bases are removed only when no disk's backing
// chain mentions them (gcBases).
import { randomBytes } from "node:crypto";
import { chmod, link, mkdir, open, readdir, rename, rm } from "node:fs/promises";
import path from "node:path";
import { execa } from "execa";
import type { AgentPaths } from "../../paths.ts";
import { exists } from "../record-store.ts";

export interface DiskTools {
  qemuImg: string;
}

/** A new instance's disk: a qcow2 over the shared empty ext4 of its size (made on first use). */
export async function createInstanceDisk(
  tools: DiskTools,
  paths: AgentPaths["qemu"],
  file: string,
  bytes: number,
): Promise<void> {
  const blank = paths.blankDisk(bytes);
  if (!(await exists(blank))) {
    await mkdir(path.dirname(blank), { recursive: true });
    // Sparse, with lazy inode-table and journal init: a 10 GiB template takes a few MB and
    // a fraction of a second. The guest's ext4 finishes the lazy init in the background.
    const tmp = `${blank}.${randomBytes(4).toString("hex")}.tmp`;
    await execa("mkfs.ext4", [
      "-q",
      "-F",
      "-L",
      "offshoot-rw",
      "-E",
      "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
      tmp,
      `${Math.floor(bytes / 1024)}k`,
    ]);
    await chmod(tmp, 0o444);
    await rename(tmp, blank);
  }
  await createOverlay(tools, file, blank, bytes, "raw");
}

/** A qcow2 overlay on `backing`; `-F` is mandatory with a backing file (FACTS.md). */
export async function createOverlay(
  tools: DiskTools,
  file: string,
  backing: string,
  bytes: number,
  backingFormat: "qcow2" | "raw" = "qcow2",
): Promise<void> {
  await execa(tools.qemuImg, [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-b",
    backing,
    "-F",
    backingFormat,
    file,
    String(bytes),
  ]);
}

/** Longest backing chain followed (a loop in corrupt headers ends here). */
const MAX_CHAIN = 64;
const QCOW2_MAGIC = 0x514649fb;

/**
 * Every file in the image's backing chain, itself first, read from the qcow2 headers; a file
 * that is not qcow2 (the raw empty template) ends the chain. Read in-process: collecting bases
 * reads every disk's chain after each delete, and one `qemu-img info` process per disk made
 * deletes on a host of 80 guests take minutes under load.
 */
export async function backingChain(file: string): Promise<string[]> {
  const chain: string[] = [];
  for (let cur: string | undefined = file; cur !== undefined; cur = await backingOf(cur)) {
    if (chain.length >= MAX_CHAIN)
      throw new Error(`${file}: backing chain longer than ${MAX_CHAIN}`);
    chain.push(cur);
  }
  return chain;
}

/** The backing file a qcow2 header names (version 2 and 3 alike: offset at 8, size at 16). */
async function backingOf(file: string): Promise<string | undefined> {
  const fh = await open(file, "r");
  try {
    const head = Buffer.alloc(20);
    const { bytesRead } = await fh.read(head, 0, head.length, 0);
    if (bytesRead < head.length || head.readUInt32BE(0) !== QCOW2_MAGIC) return undefined;
    const offset = head.readBigUInt64BE(8);
    const size = head.readUInt32BE(16);
    if (offset === 0n || size === 0) return undefined;
    if (size > 1023) throw new Error(`${file}: backing file name of ${size} bytes`);
    const name = Buffer.alloc(size);
    await fh.read(name, 0, size, Number(offset));
    const backing = name.toString("utf8");
    return path.isAbsolute(backing) ? backing : path.resolve(path.dirname(file), backing);
  } finally {
    await fh.close();
  }
}

/**
 * Moves the instance's disk (which no running QEMU may hold) into the bases dir, read-only, and
 * puts a new overlay on it in its place. Returns the base. Undo with `unfreezeDisk`.
 *
 * Crash-safe: `disk` names a whole disk at every instant, so an agent killed here (recovery does
 * not know the base's name, so it cannot put things back) leaves the instance usable. Hence a
 * hard link rather than a move, the overlay made beside the disk and renamed over it, and the
 * chmod last (before the rename the base is still the disk's inode). A crash before the rename
 * leaves only an extra name for the disk in the bases dir, which no chain uses (gcBases).
 */
export async function freezeDisk(
  tools: DiskTools,
  paths: AgentPaths["qemu"],
  disk: string,
  bytes: number,
): Promise<string> {
  await mkdir(paths.basesDir, { recursive: true });
  const base = paths.baseFile(randomBytes(8).toString("hex"));
  const next = `${disk}.next`;
  await link(disk, base);
  try {
    await createOverlay(tools, next, base, bytes);
    await rename(next, disk);
  } catch (e) {
    await rm(next, { force: true });
    await rm(base, { force: true });
    throw e;
  }
  await chmod(base, 0o444);
  return base;
}

/** Reverses freezeDisk while nothing else uses the base: the base returns over the overlay
 * (one rename, so a crash leaves either of the two whole disks). */
export async function unfreezeDisk(disk: string, base: string): Promise<void> {
  await chmod(base, 0o644);
  await rename(base, disk);
}

/** Where disks are: instances' and snapshots' directories. A record's `disk_base` (a
 * snapshot's disk, frozen) is in use as long as the record is. */
export interface DiskHolders {
  readonly layout: Pick<AgentPaths["qemu"], "instancesDir" | "diskFile">;
  readonly store: {
    ids(): Promise<string[]>;
    read(id: string): Promise<{ kind: string; record?: { disk_base: string | null } }>;
  };
}

/** Removes bases no instance's or snapshot's disk chain uses any more. */
export async function gcBases(
  paths: AgentPaths["qemu"],
  holders: readonly DiskHolders[],
): Promise<string[]> {
  let bases: string[];
  try {
    bases = (await readdir(paths.basesDir)).map((n) => paths.baseFile(n));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw e;
  }
  if (bases.length === 0) return [];
  const used = new Set<string>();
  for (const { layout, store } of holders) {
    let ids: string[] = [];
    try {
      ids = await readdir(layout.instancesDir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
    for (const id of ids) {
      const read = await store.read(id);
      if (read.kind === "corrupt") return [];
      const pinned = read.record?.disk_base;
      if (pinned) {
        for (const f of await backingChain(pinned).catch(() => [pinned])) used.add(f);
      }
      try {
        for (const f of await backingChain(layout.diskFile(id))) used.add(f);
      } catch {
        // No disk (a half-made instance, a snapshot holding a base) or unreadable: an
        // unreadable chain must keep every base.
        if (await exists(layout.diskFile(id))) return [];
      }
    }
  }
  const removed = bases.filter((b) => !used.has(b));
  for (const b of removed) await rm(b, { force: true });
  return removed;
}

/** Removes memory bases no instance or snapshot record refers to. An unreadable record keeps
 * them all. */
export async function gcMemBases(
  paths: AgentPaths["qemu"],
  stores: readonly {
    ids(): Promise<string[]>;
    read(id: string): Promise<{ kind: string; record?: { ram_base: string | null } }>;
  }[],
): Promise<string[]> {
  let bases: string[];
  try {
    bases = (await readdir(paths.memBasesDir)).map((n) => paths.memBaseFile(n));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw e;
  }
  if (bases.length === 0) return [];
  const used = new Set<string>();
  for (const store of stores) {
    for (const id of await store.ids()) {
      const read = await store.read(id);
      if (read.kind === "corrupt") return [];
      if (read.record?.ram_base) used.add(read.record.ram_base);
    }
  }
  const removed = bases.filter((b) => !used.has(b));
  for (const b of removed) await rm(b, { force: true });
  return removed;
}

export type CopyPath = "reflink" | "copy";

/** Whether `dir`'s filesystem makes reflink clones (FICLONE: XFS with reflink=1, btrfs). */
export async function canReflink(dir: string): Promise<boolean> {
  await mkdir(dir, { recursive: true });
  const a = path.join(dir, `.reflink-probe-${randomBytes(4).toString("hex")}`);
  try {
    await execa("sh", ["-c", 'printf x > "$1" && cp --reflink=always "$1" "$1.b"', "sh", a]);
    return true;
  } catch {
    return false;
  } finally {
    await rm(a, { force: true });
    await rm(`${a}.b`, { force: true });
  }
}

/** A disk cloned by reflink: an independent qcow2 sharing the source's blocks (and its backing
 * file, which is never written), so no chain grows and nothing is frozen. */
export async function reflinkDisk(from: string, to: string): Promise<void> {
  await execa("cp", ["--reflink=always", from, to]);
}

/** Copies a (possibly large, sparse) file: a reflink where the filesystem has them (XFS with
 * reflink=1, btrfs: ~0 s for 256 MiB), else a full sparse-aware copy. Says which happened. */
export async function copyMemory(from: string, to: string): Promise<CopyPath> {
  const r = await execa("cp", ["--reflink=always", from, to], { reject: false });
  if (r.exitCode === 0) return "reflink";
  await rm(to, { force: true });
  await execa("cp", ["--sparse=always", from, to]);
  return "copy";
}
