// The host's image cache: each imported reference points at a manifest digest, and each digest has
// one read-only rootfs (rootfs.ts) that every instance of the image shares.
//
//   <dir>/refs/<sha256 of the name>.json   ImageInfo + rootfs path
//   <dir>/rootfs/<digest hex>.ext4         built once per digest, chmod 444
import { createHash } from "node:crypto";
import { chmod, mkdir, readdir, readFile, rename, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import { ImageInfo, InvalidRequestError, NotFoundError, normalizeImageRef } from "@offshoot/shared";
import { z } from "zod";
import { openLayout } from "./oci.ts";
import { buildRootfs } from "./rootfs.ts";

export const StoredImage = ImageInfo.extend({ rootfs: z.string() });
export type StoredImage = z.infer<typeof StoredImage>;

export class ImageStore {
  private readonly refsDir: string;
  private readonly rootfsDir: string;
  /** One build per digest at a time, whoever asks. */
  private readonly building = new Map<string, Promise<number>>();

  constructor(readonly dir: string) {
    this.refsDir = path.join(dir, "refs");
    this.rootfsDir = path.join(dir, "rootfs");
  }

  /** Imports an OCI layout (directory or tarball) under `name` (default: its ref.name
   * annotation). Importing the same digest again only re-points the name. */
  async import(source: string, name?: string): Promise<StoredImage> {
    const layout = await openLayout(source);
    try {
      const { image } = layout;
      const ref = name ?? image.refName;
      if (!ref)
        throw new InvalidRequestError(`${source}: no image name given and none in the layout`);
      const normalized = normalizeImageRef(ref);
      if (!normalized) throw new InvalidRequestError(`invalid image reference "${ref}"`);
      const rootfs = this.rootfsFile(image.digest);
      const size = await this.ensureRootfs(image.digest, () =>
        buildRootfs(image.layers, `${rootfs}.stage`, rootfs),
      );
      const stored: StoredImage = {
        name: normalized,
        digest: image.digest,
        platform: image.platform,
        size_bytes: size,
        entrypoint: image.entrypoint,
        cmd: image.cmd,
        env: image.env,
        working_dir: image.working_dir,
        created_at: new Date().toISOString(),
        rootfs,
      };
      await mkdir(this.refsDir, { recursive: true });
      const file = this.refFile(normalized);
      await writeFile(`${file}.tmp`, JSON.stringify(stored));
      await rename(`${file}.tmp`, file);
      return stored;
    } finally {
      await layout.close();
    }
  }

  async list(): Promise<StoredImage[]> {
    let names: string[];
    try {
      names = await readdir(this.refsDir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw e;
    }
    const out: StoredImage[] = [];
    for (const n of names.filter((f) => f.endsWith(".json"))) {
      const parsed = StoredImage.safeParse(
        JSON.parse(await readFile(path.join(this.refsDir, n), "utf8")),
      );
      if (parsed.success) out.push(parsed.data);
    }
    return out.sort((a, b) => a.name.localeCompare(b.name));
  }

  /** The image a spec names; NotFoundError when this host has not imported it. */
  async get(ref: string): Promise<StoredImage> {
    const normalized = normalizeImageRef(ref);
    if (normalized) {
      try {
        return StoredImage.parse(JSON.parse(await readFile(this.refFile(normalized), "utf8")));
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
      }
    }
    throw new NotFoundError(`image ${ref} not found on this host`);
  }

  private refFile(name: string): string {
    return path.join(this.refsDir, `${createHash("sha256").update(name).digest("hex")}.json`);
  }

  private rootfsFile(digest: string): string {
    return path.join(this.rootfsDir, `${digest.slice("sha256:".length)}.ext4`);
  }

  private async ensureRootfs(digest: string, build: () => Promise<number>): Promise<number> {
    const file = this.rootfsFile(digest);
    const existing = await stat(file).catch(() => undefined);
    if (existing) return existing.size;
    const running = this.building.get(digest);
    if (running) return running;
    const p = (async () => {
      await mkdir(this.rootfsDir, { recursive: true });
      const size = await build();
      await chmod(file, 0o444);
      return size;
    })();
    this.building.set(digest, p);
    try {
      return await p;
    } finally {
      this.building.delete(digest);
    }
  }
}
