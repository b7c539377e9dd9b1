// The commands that are the host's, not an instance's: pulling images, making or removing
// volumes, and removing or compressing snapshots. They take no instance lock; each answers
// with an outcome like any command.
import type { HostOperation } from "@offshoot/shared";
import type { Driver } from "../drivers/driver.ts";
import type { Outcome } from "../journal.ts";
import type { VolumeStore } from "../volumes.ts";
import type { ImagePulls } from "./image-pull.ts";
import { toCommandError } from "./index.ts";

export class HostOps {
  constructor(
    private readonly pulls: ImagePulls,
    private readonly volumes: VolumeStore,
    private readonly driver: Driver,
    /** Fetches an archive the control plane holds for a volume_create. */
    private readonly fetchArchive: (id: string) => Promise<AsyncIterable<Uint8Array>>,
  ) {}

  async run(commandId: string, op: HostOperation): Promise<Outcome> {
    if (op.kind === "image_pull") return this.pulls.run(commandId, op);
    try {
      if (op.kind === "volume_create") {
        const { archive } = op;
        await this.volumes.create(
          op.key,
          op.size_bytes,
          archive && { bytes: archive.bytes, fetch: () => this.fetchArchive(archive.id) },
        );
      } else if (op.kind === "snapshot_delete") {
        await this.driver.snapshotDelete(op.snapshot_id);
      } else if (op.kind === "snapshot_compress") {
        return { ok: true, instances: [], snapshot: await this.driver.snapshotCompress(op) };
      } else await this.volumes.delete(op.key, await this.driver.volumesInUse());
      return { ok: true, instances: [] };
    } catch (err) {
      return { ok: false, error: toCommandError(err), instances: [] };
    }
  }
}
