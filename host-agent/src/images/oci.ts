// Reading an OCI image layout (https://github.com/opencontainers/image-spec/blob/main/image-layout.md):
// index.json → (an index per platform →) the linux/amd64 manifest → its config and layers. Every
// blob is checked against its digest before use. A layout may be a directory or a tar of one.
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdtemp, readFile, rm, stat } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { InvalidRequestError } from "@offshoot/shared";
import { execa } from "execa";
import { z } from "zod";
import {
  ConfigDoc,
  type Descriptor,
  envOf,
  INDEX_TYPES,
  IndexDoc,
  layerCompression,
  ManifestDoc,
} from "./registry.ts";

export interface OciLayer {
  file: string;
  compression: "gzip" | "zstd" | "tar";
}

export interface OciImage {
  /** The manifest's digest: what identifies the image (and its rootfs). */
  digest: string;
  platform: string;
  /** Bottom layer first. */
  layers: OciLayer[];
  entrypoint: string[] | null;
  cmd: string[] | null;
  env: Record<string, string>;
  working_dir: string | null;
  user: string | null;
  /** The ref.name annotation of the chosen index entry, if any. */
  refName: string | undefined;
}

/** An opened layout: read it, then `close()` (removes what a tarball was unpacked into). */
export interface OpenedLayout {
  image: OciImage;
  close(): Promise<void>;
}

export async function openLayout(source: string): Promise<OpenedLayout> {
  const st = await stat(source).catch(() => undefined);
  if (!st) throw new InvalidRequestError(`no OCI layout at ${source}`);
  if (st.isDirectory()) return { image: await readLayout(source), close: async () => {} };
  const dir = await mkdtemp(path.join(os.tmpdir(), "oci-"));
  try {
    await execa("tar", ["-xf", source, "-C", dir]);
    return { image: await readLayout(dir), close: () => rm(dir, { recursive: true, force: true }) };
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    throw e;
  }
}

async function readLayout(dir: string): Promise<OciImage> {
  const layout = await readJson(
    path.join(dir, "oci-layout"),
    z.object({ imageLayoutVersion: z.string() }),
  );
  if (!layout.imageLayoutVersion.startsWith("1.")) {
    throw new InvalidRequestError(`unsupported OCI layout version ${layout.imageLayoutVersion}`);
  }
  const index = await readJson(path.join(dir, "index.json"), IndexDoc);
  let entry = pickPlatform(index.manifests, dir);
  const refName = entry.annotations?.["org.opencontainers.image.ref.name"];
  while (INDEX_TYPES.has(entry.mediaType)) {
    entry = pickPlatform((await readBlobJson(dir, entry, IndexDoc)).manifests, dir);
  }
  const manifest = await readBlobJson(dir, entry, ManifestDoc);
  const config = await readBlobJson(dir, manifest.config, ConfigDoc);
  const arch = config.architecture ?? entry.platform?.architecture ?? "amd64";
  const osName = config.os ?? entry.platform?.os ?? "linux";
  if (osName !== "linux" || arch !== "amd64") {
    throw new InvalidRequestError(`image is ${osName}/${arch}; this host runs linux/amd64`);
  }
  const layers: OciLayer[] = [];
  for (const l of manifest.layers) {
    const compression = layerCompression(l.mediaType);
    if (!compression) throw new InvalidRequestError(`unsupported layer type ${l.mediaType}`);
    layers.push({ file: await verifiedBlob(dir, l), compression });
  }
  const c = config.config ?? {};
  const env = envOf(c.Env);
  return {
    digest: entry.digest,
    platform: `${osName}/${arch}`,
    layers,
    entrypoint: c.Entrypoint ?? null,
    cmd: c.Cmd ?? null,
    env,
    working_dir: c.WorkingDir || null,
    user: c.User || null,
    refName,
  };
}

/** One entry, or the linux/amd64 one of several. */
function pickPlatform(entries: Descriptor[], dir: string): Descriptor {
  if (entries.length === 1 && entries[0]) return entries[0];
  const amd64 = entries.find(
    (e) => e.platform?.os === "linux" && e.platform.architecture === "amd64",
  );
  if (amd64) return amd64;
  throw new InvalidRequestError(
    entries.length === 0
      ? `${dir}: index.json lists no manifests`
      : `${dir}: no linux/amd64 manifest`,
  );
}

async function readJson<T>(file: string, schema: z.ZodType<T>): Promise<T> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch {
    throw new InvalidRequestError(`not an OCI layout: ${path.basename(file)} missing`);
  }
  const parsed = schema.safeParse(JSON.parse(text));
  if (!parsed.success) throw new InvalidRequestError(`${file}: ${parsed.error.message}`);
  return parsed.data;
}

async function readBlobJson<T>(dir: string, d: Descriptor, schema: z.ZodType<T>): Promise<T> {
  return readJson(await verifiedBlob(dir, d), schema);
}

/** The blob's path, once its size and sha256 match the descriptor. */
async function verifiedBlob(dir: string, d: Descriptor): Promise<string> {
  const hex = d.digest.slice("sha256:".length);
  const file = path.join(dir, "blobs", "sha256", hex);
  const hash = createHash("sha256");
  let size = 0;
  try {
    for await (const chunk of createReadStream(file)) {
      hash.update(chunk as Buffer);
      size += (chunk as Buffer).length;
    }
  } catch {
    throw new InvalidRequestError(`blob ${d.digest} missing from the layout`);
  }
  if (size !== d.size || hash.digest("hex") !== hex) {
    throw new InvalidRequestError(`blob ${d.digest} does not match its digest or size`);
  }
  return file;
}
