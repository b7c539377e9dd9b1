// Volumes on this host: one sparse ext4 file each, `<data>/volumes/<key>.ext4`, named by the
// control plane's key for it. Guests attach them as virtio disks (read-only by any number of
// instances, writable by one: the control plane enforces that); the file outlives every instance.
import { mkdir, rename, rm, stat } from "node:fs/promises";
import path from "node:path";
import { InvalidStateError } from "@offshoot/shared";
import { execa } from "execa";

export class VolumeStore {
  constructor(readonly dir: string) {}

  file(key: string): string {
    return path.join(this.dir, `${key}.ext4`);
  }

  /** Makes the volume (an empty ext4 of `sizeBytes`); one already there is kept as it is. */
  async create(key: string, sizeBytes: number): Promise<void> {
    const file = this.file(key);
    if (await stat(file).catch(() => undefined)) return;
    await mkdir(this.dir, { recursive: true });
    const tmp = `${file}.partial`;
    await rm(tmp, { force: true });
    try {
      await execa("mkfs.ext4", [
        "-q",
        "-F",
        "-L",
        "offshoot-vol",
        "-E",
        "root_owner=0:0",
        tmp,
        `${Math.floor(sizeBytes / 1024)}k`,
      ]);
      await rename(tmp, file);
    } finally {
      await rm(tmp, { force: true });
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
