// A Standby snapshot's memory kept compressed at rest (zstd or lz4, by their Debian CLIs). The
// payload is the frozen memory base the snapshot maps, or, for a snapshot whose RAM is inside
// its device-state stream, that stream. Once the compressed file is whole, the snapshot stops
// holding the payload, so base collection removes it when nothing else maps it (its source or
// a running fork may still).
//
// A fork or restore from a compressed snapshot first thaws it: the payload is decompressed once
// into a new memory base (or the stream file) that the snapshot holds again, and every fork made
// meanwhile maps that one copy. When no fork maps it and none is being made, it is released
// (releaseThawed, run by base collection), and the snapshot is back to its compressed file.
import { randomBytes } from "node:crypto";
import { mkdir, rename, rm, stat } from "node:fs/promises";
import path from "node:path";
import { InvalidStateError, type SnapshotInfo } from "@offshoot/shared";
import { COMPRESSED_EXT, compressFile, decompressFile } from "../../compressors.ts";
import type { OpData } from "../driver.ts";
import { exists, isMissing } from "../record-store.ts";
import { load, type QemuHost } from "./host.ts";
import type { QemuRecord } from "./store.ts";

/** The file a compressed snapshot's payload decompresses into: its memory base, or its
 * device-state stream. */
function payloadOf(snaps: QemuHost, rec: QemuRecord): string | null {
  return rec.ram === "stream" ? snaps.paths.devStateFile(rec.observed.id) : rec.ram_base;
}

/**
 * snapshot_compress: writes the payload compressed beside the snapshot's record (a temporary
 * name until whole), records it, then lets base collection release the uncompressed payload.
 * Run again, it answers with what it did.
 */
export async function snapshotCompress(
  host: QemuHost,
  op: OpData<"snapshot_compress">,
  gc: () => Promise<void>,
): Promise<SnapshotInfo> {
  const snaps = host.views.snapshots;
  const id = op.snapshot_id;
  const rec = await load(snaps, id);
  if (rec.compressed === null) {
    const payload = payloadOf(snaps, rec);
    if (rec.observed.state !== "Standby" || payload === null) {
      throw new InvalidStateError(`snapshot ${id} holds no memory to compress`);
    }
    const file = path.join(snaps.paths.instanceDir(id), `memory.${COMPRESSED_EXT[op.algorithm]}`);
    await compressFile(op.algorithm, op.level, payload, file);
    const [raw, packed] = await Promise.all([stat(payload), stat(file)]);
    await host.payloads.run([id], async () => {
      const now = await load(snaps, id);
      await snaps.store.write({
        ...now,
        compressed: {
          file,
          algorithm: op.algorithm,
          level: op.level,
          compressed_bytes: packed.size,
          uncompressed_bytes: raw.size,
        },
      });
    });
    await gc();
  }
  const done = await load(snaps, id);
  return {
    id,
    size_bytes: await snapshotBytes(snaps, done),
    compressed_size_bytes: done.compressed?.compressed_bytes,
    uncompressed_size_bytes: done.compressed?.uncompressed_bytes,
  };
}

/**
 * Bytes the snapshot's files hold on disk (allocated blocks, so a sparse memory file counts what
 * the guest touched): its memory (compressed, if it is) and device state, and its disk. Blocks it
 * shares are counted too; a thawed copy is not (forks hold it, not the snapshot at rest).
 */
export async function snapshotBytes(snaps: QemuHost, snap: QemuRecord): Promise<number> {
  const id = snap.observed.id;
  const packed = snap.compressed;
  const files = [
    packed ? packed.file : snap.ram_base,
    packed && snap.ram === "stream" ? null : snaps.paths.devStateFile(id),
    snap.disk_base ?? snaps.paths.diskFile(id),
  ];
  let bytes = 0;
  for (const f of files) {
    if (f === null) continue;
    try {
      bytes += (await stat(f)).blocks * 512;
    } catch (e) {
      if (!isMissing(e)) throw e;
    }
  }
  return bytes;
}

/**
 * Before a fork or restore reads a snapshot: its payload, decompressed if it is kept compressed
 * and no copy is out now. The caller is counted among the copy's users (so it is not released
 * under it) until it calls the returned `done`.
 */
export async function thaw(
  host: QemuHost,
  snap: QemuRecord,
): Promise<{ rec: QemuRecord; done: () => void }> {
  if (snap.compressed === null) return { rec: snap, done: () => {} };
  const id = snap.observed.id;
  host.thawUsers.set(id, (host.thawUsers.get(id) ?? 0) + 1);
  const done = () => {
    const n = (host.thawUsers.get(id) ?? 1) - 1;
    if (n === 0) host.thawUsers.delete(id);
    else host.thawUsers.set(id, n);
  };
  try {
    const rec = await host.payloads.run([id], () => thawLocked(host.views.snapshots, id));
    return { rec, done };
  } catch (e) {
    done();
    throw e;
  }
}

async function thawLocked(snaps: QemuHost, id: string): Promise<QemuRecord> {
  const rec = await load(snaps, id);
  const packed = rec.compressed;
  if (packed === null) return rec;
  const out = payloadOf(snaps, rec);
  if (out !== null && (await exists(out))) return rec;
  if (rec.ram === "stream") {
    await decompressFile(packed.algorithm, packed.file, snaps.paths.devStateFile(id));
    return rec;
  }
  // A new memory base, decompressed beside the record (base collection removes any file of the
  // bases' directory no record names) and named by the record before it is moved there: after a
  // crash between the two, the next reader finds no file and decompresses again.
  const thawed = path.join(snaps.paths.instanceDir(id), "memory.thawed");
  await decompressFile(packed.algorithm, packed.file, thawed, 0o444);
  const base = snaps.paths.memBaseFile(randomBytes(8).toString("hex"));
  await mkdir(snaps.paths.memBasesDir, { recursive: true });
  const next: QemuRecord = { ...rec, ram_base: base };
  await snaps.store.write(next);
  await rename(thawed, base);
  return next;
}

/**
 * Compressed snapshots give up their uncompressed payload once nothing else uses it: no record
 * but compressed snapshots' names the memory base (the stream is never shared) and no fork from
 * them is being made. Base collection then removes the base.
 */
export async function releaseThawed(
  host: QemuHost,
  stores: readonly QemuHost["store"][],
): Promise<void> {
  const snaps = host.views.snapshots;
  const records = async (store: QemuHost["store"]): Promise<QemuRecord[] | null> => {
    const found: QemuRecord[] = [];
    for (const id of await store.ids()) {
      const read = await store.read(id);
      if (read.kind === "corrupt") return null;
      if (read.kind === "ok") found.push(read.record);
    }
    return found;
  };
  // Most hosts have no compressed snapshot: then the other records are not read at all (base
  // collection reads them next).
  const packed = (await records(snaps.store))?.filter((r) => r.compressed !== null);
  if (!packed?.length) return;
  const mapped = new Set<string>();
  for (const store of stores) {
    const all = await records(store);
    if (all === null) return;
    for (const r of all) if (r.compressed === null && r.ram_base) mapped.add(r.ram_base);
  }
  for (const snap of packed) {
    const id = snap.observed.id;
    if (host.thawUsers.has(id)) continue;
    if (snap.ram === "stream") {
      await host.payloads.run([id], async () => {
        if (!host.thawUsers.has(id)) await rm(snaps.paths.devStateFile(id), { force: true });
      });
    } else if (snap.ram_base !== null && !mapped.has(snap.ram_base)) {
      await host.payloads.run([id], async () => {
        const now = await load(snaps, id);
        if (host.thawUsers.has(id) || now.ram_base !== snap.ram_base) return;
        await snaps.store.write({ ...now, ram_base: null });
      });
    }
  }
}
