// Images as the API shows them: what connected hosts reported in hello (hosts import and convert
// images; the control plane only knows what they hold). Images are shared by every tenant.
import { type Image, type ImageInfo, NotFoundError, normalizeImageRef } from "@offshoot/shared";
import type { Executor } from "../db/client.ts";
import { hosts } from "../db/schema/index.ts";
import { type HostRow, online } from "./placement.ts";

function present(i: ImageInfo): Image {
  return {
    name: i.name,
    digest: i.digest,
    platform: i.platform,
    status: "ready",
    queue_position: null,
    error: null,
    size_bytes: i.size_bytes,
    entrypoint: i.entrypoint,
    cmd: i.cmd,
    env: i.env,
    created_at: i.created_at,
  };
}

/** One entry per name; where hosts disagree, the most recently imported wins. */
export async function listImages(db: Executor, graceMs: number | null): Promise<Image[]> {
  const rows = await db.select({ images: hosts.images }).from(hosts).where(online(graceMs));
  const byName = new Map<string, ImageInfo>();
  for (const i of rows.flatMap((r) => r.images)) {
    const seen = byName.get(i.name);
    if (!seen || seen.created_at < i.created_at) byName.set(i.name, i);
  }
  return [...byName.values()].sort((a, b) => a.name.localeCompare(b.name)).map(present);
}

export async function getImage(db: Executor, graceMs: number | null, name: string): Promise<Image> {
  const normalized = normalizeImageRef(name);
  const found = normalized && (await listImages(db, graceMs)).find((i) => i.name === normalized);
  if (!found) throw new NotFoundError(`image ${name} not found`);
  return found;
}

/** Why `host` cannot boot `image`, or undefined if it can (or needs no images). */
export function lacksImage(host: HostRow, image: string): string | undefined {
  if (!host.capabilities?.images) return undefined;
  const normalized = normalizeImageRef(image);
  if (host.images.some((i) => i.name === normalized)) return undefined;
  return `image ${image} not found on host ${host.name}`;
}

/** 404 unless some connected host can boot `image` (checked before placement, which then
 * only considers such hosts). */
export async function requireImage(
  db: Executor,
  graceMs: number | null,
  image: string,
): Promise<void> {
  const candidates = await db.select().from(hosts).where(online(graceMs));
  if (candidates.length > 0 && candidates.every((h) => lacksImage(h, image))) {
    throw new NotFoundError(
      `image ${image} not found: no connected host has imported it (GET /images lists them)`,
    );
  }
}
