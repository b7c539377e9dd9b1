// Volumes on this host: one sparse ext4 file each, `<data>/volumes/<key>.ext4`, named by the
// control plane's key for it. Guests attach them as virtio disks (read-only by any number of
// instances, writable by one: the control plane enforces that); the file outlives every instance.
import { createWriteStream } from "node:fs";
import { mkdir, open, rename, rm, stat } from "node:fs/promises";
import path from "node:path";
import { pipeline } from "node:stream/promises";
import { InvalidRequestError, InvalidStateError } from "@offshoot/shared";
import { execa } from "execa";
import { extractConfined, measure } from "./images/rootfs.ts";

export class VolumeStore {
  constructor(readonly dir: string) {}

  file(key: string): string {
    return path.join(this.dir, `${key}.ext4`);
  }

  /**
   * Makes the volume: an ext4 of `sizeBytes`, empty or holding what `archive` (a tar.gz of at
   * most `bytes`) unpacks to — unpacked confined to the volume, as image layers are. One
   * already there is kept as it is; a failure leaves nothing.
   */
  async create(
    key: string,
    sizeBytes: number,
    archive?: { bytes: number; fetch: () => Promise<AsyncIterable<Uint8Array>> },
  ): Promise<void> {
    const file = this.file(key);
    if (await stat(file).catch(() => undefined)) return;
    await mkdir(this.dir, { recursive: true });
    const tmp = `${file}.partial`;
    const tarball = `${file}.archive`;
    const stage = `${file}.stage`;
    const clear = () =>
      Promise.all([tmp, tarball, stage].map((p) => rm(p, { recursive: true, force: true })));
    await clear();
    try {
      const mkfs = ["-q", "-F", "-L", "offshoot-vol", "-E", "root_owner=0:0"];
      if (archive) {
        await download(archive, tarball);
        // gzip's trailer gives the unpacked size (mod 4 GiB): a tar that says it is larger than
        // the volume is refused before it is unpacked onto this host's disk.
        const said = await gzipSize(tarball);
        if (said > sizeBytes * 0.9) {
          throw new InvalidRequestError(
            `the archive's files (${said} bytes unpacked) do not fit in a volume of ${sizeBytes} bytes`,
          );
        }
        await mkdir(stage);
        await extractConfined({ file: tarball, compression: "gzip" }, stage);
        const { bytes, entries } = await measure(stage);
        // ext4's own metadata takes some of the volume: what fits is less than its size.
        if (bytes + entries * 256 > sizeBytes * 0.9) {
          throw new InvalidRequestError(
            `the archive's files (${bytes} bytes) do not fit in a volume of ${sizeBytes} bytes`,
          );
        }
        mkfs.push("-d", stage);
      }
      await execa("mkfs.ext4", [...mkfs, tmp, `${Math.floor(sizeBytes / 1024)}k`]);
      await rename(tmp, file);
    } finally {
      await clear();
    }
  }

  /** Removes the volume; refused while an instance on this host attaches it. */
  async delete(key: string, attached: Set<string>): Promise<void> {
    if (attached.has(key)) {
      throw new InvalidStateError(`volume ${key} is attached to an instance on this host`);
    }
    await rm(this.file(key), { force: true });
  }
}

/** Writes the archive to `file`, refusing one longer or shorter than announced. */
async function download(
  archive: { bytes: number; fetch: () => Promise<AsyncIterable<Uint8Array>> },
  file: string,
): Promise<void> {
  let got = 0;
  const chunks = await archive.fetch();
  async function* checked() {
    for await (const chunk of chunks) {
      got += chunk.length;
      if (got > archive.bytes)
        throw new InvalidRequestError("the archive is longer than announced");
      yield chunk;
    }
  }
  await pipeline(checked(), createWriteStream(file));
  if (got !== archive.bytes) {
    throw new InvalidRequestError(`the archive ended after ${got} of ${archive.bytes} bytes`);
  }
}

/** The unpacked size a gzip file's trailer states (ISIZE: the size modulo 2^32). */
async function gzipSize(file: string): Promise<number> {
  const fh = await open(file, "r");
  try {
    const { size } = await fh.stat();
    if (size < 18) return 0;
    const b = Buffer.alloc(4);
    await fh.read(b, 0, 4, size - 4);
    return b.readUInt32LE(0);
  } finally {
    await fh.close();
  }
}
