// The host's image cache: each imported reference points at a manifest digest, and each digest has
// one read-only rootfs (rootfs.ts) that every instance of the image shares. Pulled layers are
// kept by their own digest, so an image sharing layers with one pulled before fetches only the
// layers it adds.
//
//   <dir>/refs/<sha256 of the name>.json   ImageInfo + rootfs path (images imported at start)
//   <dir>/digests/<digest hex>.json        a pulled image: its config, layers and rootfs path
//   <dir>/blobs/sha256/<hex>               a pulled layer, verified against its digest
//   <dir>/rootfs/<digest hex>.<format>     built once per digest and format, chmod 444
import { createHash } from "node:crypto";
import {
  chmod,
  mkdir,
  readdir,
  readFile,
  rename,
  rm,
  stat,
  utimes,
  writeFile,
} from "node:fs/promises";
import path from "node:path";
import {
  DIGEST,
  ImageInfo,
  InvalidRequestError,
  NotFoundError,
  normalizeImageRef,
} from "@offshoot/shared";
import { z } from "zod";
import { type OciLayer, openLayout } from "./oci.ts";
import {
  envOf,
  layerCompression,
  PullError,
  parsePlatform,
  RegistryClient,
  type RegistryOptions,
  splitReference,
} from "./registry.ts";
import { buildRootfs, type RootfsFormat } from "./rootfs.ts";

export const StoredImage = ImageInfo.extend({
  rootfs: z.string(),
  /** The config's User ("name", "uid", "name:group", …); null: root. */
  user: z.string().nullable().default(null),
});
export type StoredImage = z.infer<typeof StoredImage>;

/** A pulled image as this host keeps it: by digest, with no name (names are the tenants', in
 * the control plane). */
export const PulledImage = StoredImage.omit({ name: true }).extend({
  layers: z.array(z.string()),
});
export type PulledImage = z.infer<typeof PulledImage>;

export type PullPhase = "pulling" | "converting";
export interface PullProgress {
  phase: PullPhase;
  /** Bytes of layers fetched so far, of those this host did not already hold. */
  bytes_done: number;
  bytes_total: number;
}

export interface PullOptions extends RegistryOptions {
  /** "os/arch[/variant]"; default linux/amd64. */
  platform?: string;
  onProgress?: (p: PullProgress) => void;
}

export class ImageStore {
  private readonly refsDir: string;
  private readonly rootfsDir: string;
  /** One build per digest at a time, whoever asks. */
  private readonly building = new Map<string, Promise<number>>();

  constructor(
    readonly dir: string,
    /** What new root filesystems are built as (ones already built stay as they are). */
    readonly format: RootfsFormat = "erofs",
  ) {
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
        buildRootfs(image.layers, `${rootfs}.stage`, rootfs, this.format),
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
        user: image.user,
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

  /**
   * Pulls `ref` from its registry: resolves it to one platform's manifest, fetches the layers
   * this host does not hold yet (each verified against its digest while it streams), and builds
   * the rootfs once per manifest digest. A failure leaves nothing marked ready: a layer is kept
   * only once verified, a rootfs only once built whole.
   */
  async pull(ref: string, options: PullOptions = {}): Promise<PulledImage> {
    const normalized = normalizeImageRef(ref);
    if (!normalized) throw new PullError(`invalid image reference "${ref}"`);
    const client = new RegistryClient(splitReference(normalized), options);
    options.onProgress?.({ phase: "pulling", bytes_done: 0, bytes_total: 0 });
    const resolved = await client.resolve(parsePlatform(options.platform ?? "linux/amd64"));
    const have = await this.pulled(resolved.digest);
    if (have) return have;
    const layers = resolved.manifest.layers;
    const missing: typeof layers = [];
    for (const l of layers) {
      if (
        !(await stat(this.blobFile(l.digest)).catch(() => undefined)) &&
        !missing.some((m) => m.digest === l.digest)
      )
        missing.push(l);
    }
    const progress = {
      phase: "pulling" as PullPhase,
      bytes_done: 0,
      bytes_total: missing.reduce((n, l) => n + l.size, 0),
    };
    const report = () => options.onProgress?.({ ...progress });
    report();
    await mkdir(path.join(this.dir, "blobs", "sha256"), { recursive: true });
    for (const l of missing) {
      await this.once(`blob:${l.digest}`, async () => {
        if (await stat(this.blobFile(l.digest)).catch(() => undefined)) return;
        await client.download(l, this.blobFile(l.digest), (n) => {
          progress.bytes_done += n;
          report();
        });
      });
    }
    progress.phase = "converting";
    report();
    const c = resolved.config.config ?? {};
    const rootfs = this.rootfsFile(resolved.digest);
    const ociLayers: OciLayer[] = layers.map((l) => ({
      file: this.blobFile(l.digest),
      compression: layerCompression(l.mediaType) ?? "tar",
    }));
    const size = await this.ensureRootfs(resolved.digest, () =>
      buildRootfs(ociLayers, `${rootfs}.stage`, rootfs, this.format),
    );
    const image: PulledImage = {
      digest: resolved.digest,
      platform: resolved.platform,
      size_bytes: size,
      entrypoint: c.Entrypoint ?? null,
      cmd: c.Cmd ?? null,
      env: envOf(c.Env),
      working_dir: c.WorkingDir || null,
      user: c.User || null,
      created_at: new Date().toISOString(),
      rootfs,
      layers: layers.map((l) => l.digest),
    };
    await mkdir(path.join(this.dir, "digests"), { recursive: true });
    const file = this.digestFile(resolved.digest);
    await writeFile(`${file}.tmp`, JSON.stringify(image));
    await rename(`${file}.tmp`, file);
    return image;
  }

  /** The pulled image with this manifest digest, if this host holds it. */
  async pulled(digest: string): Promise<PulledImage | undefined> {
    if (!DIGEST.test(digest)) return undefined;
    try {
      const image = PulledImage.parse(JSON.parse(await readFile(this.digestFile(digest), "utf8")));
      return (await stat(image.rootfs).catch(() => undefined)) ? image : undefined;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw e;
    }
  }

  /** Digests of the pulled images this host holds (reported in hello, for placement). */
  async pulledDigests(): Promise<string[]> {
    const names = await readdir(path.join(this.dir, "digests")).catch(() => [] as string[]);
    return names
      .filter((n) => /^[a-f0-9]{64}\.json$/.test(n))
      .map((n) => `sha256:${n.slice(0, 64)}`);
  }

  /**
   * What an instance boots: the pulled image its spec pins by digest (pulled now, without
   * credentials, if this host does not hold it yet), else the image imported under its name.
   */
  async forSpec(spec: { image: string; image_digest?: string | null }): Promise<StoredImage> {
    if (!spec.image_digest) return this.get(spec.image);
    let image = await this.pulled(spec.image_digest);
    if (image) {
      // Recently used: the last the cache evicts.
      const now = new Date();
      await utimes(this.digestFile(image.digest), now, now).catch(() => {});
    }
    if (!image) {
      const normalized = normalizeImageRef(spec.image);
      const base = normalized?.split("@")[0];
      if (!base) throw new NotFoundError(`image ${spec.image} not found on this host`);
      const byDigest = `${base.replace(/:[^/:]+$/, "")}@${spec.image_digest}`;
      try {
        image = await this.pull(byDigest);
      } catch (e) {
        throw new NotFoundError(
          `image ${spec.image} is not on this host and pulling it here failed: ${(e as Error).message}`,
        );
      }
    }
    const { layers: _, ...info } = image;
    return { ...info, name: spec.image };
  }

  /**
   * Keeps the pulled images' files (rootfs and layers) within `maxBytes`: least recently used
   * first (a boot or a pull uses one), never one in `inUse` (rootfs paths; "*": all) or
   * `keep`. A layer goes once no image left needs it. Returns the digests evicted: an instance
   * placed here later pulls its image again.
   */
  async evict(maxBytes: number, inUse: Set<string>, keep?: string): Promise<string[]> {
    if (inUse.has("*")) return [];
    const held = await Promise.all(
      (await this.pulledDigests()).map(async (d) => {
        const image = await this.pulled(d);
        const used = await stat(this.digestFile(d)).catch(() => undefined);
        return image ? { image, usedAt: used?.mtimeMs ?? 0 } : undefined;
      }),
    );
    const images = held.filter((h) => h !== undefined).sort((a, b) => a.usedAt - b.usedAt);
    const sizeOf = async (f: string) => (await stat(f).catch(() => undefined))?.size ?? 0;
    const blobSizes = new Map<string, number>();
    for (const { image } of images) {
      for (const l of image.layers) {
        if (!blobSizes.has(l)) blobSizes.set(l, await sizeOf(this.blobFile(l)));
      }
    }
    const rootfsSizes = new Map<string, number>();
    for (const { image } of images) rootfsSizes.set(image.digest, await sizeOf(image.rootfs));
    const total = () => {
      const layers = new Set(images.flatMap((i) => i.image.layers));
      let n = 0;
      for (const l of layers) n += blobSizes.get(l) ?? 0;
      for (const i of images) n += rootfsSizes.get(i.image.digest) ?? 0;
      return n;
    };
    const evicted: string[] = [];
    for (let i = 0; i < images.length && total() > maxBytes; ) {
      const { image } = images[i] as (typeof images)[number];
      if (image.digest === keep || inUse.has(image.rootfs)) {
        i++;
        continue;
      }
      images.splice(i, 1);
      await rm(this.digestFile(image.digest), { force: true });
      await rm(image.rootfs, { force: true });
      const still = new Set(images.flatMap((x) => x.image.layers));
      for (const l of image.layers) if (!still.has(l)) await rm(this.blobFile(l), { force: true });
      evicted.push(image.digest);
    }
    return evicted;
  }

  /** One run of `work` per key at a time, whoever asks. */
  private readonly inFlight = new Map<string, Promise<void>>();
  private async once(key: string, work: () => Promise<void>): Promise<void> {
    for (let p = this.inFlight.get(key); p; p = this.inFlight.get(key)) await p.catch(() => {});
    const run = work();
    this.inFlight.set(key, run);
    try {
      await run;
    } finally {
      if (this.inFlight.get(key) === run) this.inFlight.delete(key);
    }
  }

  private blobFile(digest: string): string {
    return path.join(this.dir, "blobs", "sha256", digest.slice("sha256:".length));
  }

  private digestFile(digest: string): string {
    return path.join(this.dir, "digests", `${digest.slice("sha256:".length)}.json`);
  }

  private refFile(name: string): string {
    return path.join(this.refsDir, `${createHash("sha256").update(name).digest("hex")}.json`);
  }

  private rootfsFile(digest: string): string {
    return path.join(this.rootfsDir, `${digest.slice("sha256:".length)}.${this.format}`);
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
