// Images as the API shows them: what connected hosts reported in hello (hosts import and convert
// images; the control plane only knows what they hold). Images are shared by every tenant.
import {
  formatSize,
  type Image,
  type ImageInfo,
  InvalidRequestError,
  NotFoundError,
  normalizeImageRef,
} from "@offshoot/shared";
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

/** Why `host` cannot boot a guest of `memoryBytes`, or undefined if it can. */
export function tooSmall(host: HostRow, memoryBytes: number): string | undefined {
  const min = host.capabilities?.min_memory_bytes ?? 0;
  return memoryBytes < min
    ? `size ${formatSize(memoryBytes)} is below the smallest guest host ${host.name} boots (${formatSize(min)})`
    : undefined;
}

/** 404 unless some connected host can boot `image`; 400 if every host that has it needs more
 * memory than `memoryBytes` (checked before placement, which then only considers hosts that
 * can). */
export async function requireBootable(
  db: Executor,
  graceMs: number | null,
  image: string,
  memoryBytes: number,
): Promise<void> {
  const candidates = await db.select().from(hosts).where(online(graceMs));
  if (candidates.length === 0) return; // placement says no host is connected
  const withImage = candidates.filter((h) => !lacksImage(h, image));
  if (withImage.length === 0) {
    throw new NotFoundError(
      `image ${image} not found: no connected host has imported it (GET /images lists them)`,
    );
  }
  if (withImage.every((h) => tooSmall(h, memoryBytes))) {
    const min = Math.min(...withImage.map((h) => h.capabilities?.min_memory_bytes ?? 0));
    throw new InvalidRequestError(
      `size ${formatSize(memoryBytes)} is below the smallest guest the hosts boot (${formatSize(min)})`,
    );
  }
}
