// Images as the API shows them. Two kinds:
// - a tenant's images: references it asked to pull (POST /images). A row per (tenant, name)
//   follows the pull (pending → pulling → converting → ready | failed), written only by that
//   pull's progress and result; the host that pulled keeps the layers and rootfs by digest;
// - hosts' own images: OCI layouts a host imported at start (AGENT_IMAGES), reported in hello
//   and offered to every tenant, read-only through the API.
// A tenant's image of a name hides a host image of the same name.
import { createHash, randomBytes } from "node:crypto";
import {
  ApiError,
  ConflictError,
  type CreateImageRequest,
  formatSize,
  HostUnavailableError,
  type Image,
  type ImageInfo,
  type ImageProgress,
  InvalidRequestError,
  NotFoundError,
  normalizeImageRef,
  type PushCredentials,
} from "@offshoot/shared";
import { and, asc, count, eq, getTableColumns, inArray, sql } from "drizzle-orm";
import { type Executor, transaction } from "../db/client.ts";
import { hosts, type ImageRow, images, instances, operations } from "../db/schema/index.ts";
import { hostGrace, type Services } from "./context.ts";
import { type HostRow, online } from "./placement.ts";

const IN_FLIGHT = ["pending", "pulling", "converting"] as const;
/** Hypeman's platform grammar; pulls take the platforms its API names. */
const PLATFORM = /^[a-z0-9]+\/[a-z0-9]+(\/[a-z0-9.]+)?$/;
const PULLABLE = new Set(["linux/amd64", "linux/arm64"]);

type TenantImage = ImageRow & { queuePosition: number | null };

function presentTenant(r: TenantImage): Image {
  const moving = r.status === "pulling" || r.status === "converting";
  return {
    name: r.name,
    digest: r.digest ?? "",
    platform: r.platform,
    status: r.status,
    queue_position: r.queuePosition,
    error: r.error,
    size_bytes: r.status === "ready" ? r.sizeBytes : null,
    entrypoint: r.entrypoint,
    cmd: r.cmd,
    env: r.env,
    working_dir: r.workingDir,
    tags: r.tags,
    progress: moving ? { bytes_done: r.bytesDone, bytes_total: r.bytesTotal } : null,
    created_at: r.createdAt.toISOString(),
  };
}

function presentHost(i: ImageInfo): Image {
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
    working_dir: i.working_dir,
    tags: {},
    progress: null,
    created_at: i.created_at,
  };
}

/** The tenant's images (one, by name, when `name` is given), each with its place in its host's
 * queue while pending: 1 is the next to start. */
async function tenantImages(ex: Executor, tenantId: string, name?: string): Promise<TenantImage[]> {
  const q = sql<number | null>`case when ${images.status} = 'pending' then (
      select count(*)::int from images p
      where p.host_id = ${images.hostId} and p.status = 'pending'
        and (p.requested_at, p.id) <= (${images.requestedAt}, ${images.id})) end`;
  return ex
    .select({ ...imageColumns, queuePosition: q })
    .from(images)
    .where(
      and(eq(images.tenantId, tenantId), name === undefined ? undefined : eq(images.name, name)),
    )
    .orderBy(asc(images.name));
}
const imageColumns = getTableColumns(images);

/** Images the connected hosts imported: one per name; where hosts disagree, the most recently
 * imported wins. */
async function hostImages(ex: Executor, graceMs: number | null): Promise<ImageInfo[]> {
  const rows = await ex.select({ images: hosts.images }).from(hosts).where(online(graceMs));
  const byName = new Map<string, ImageInfo>();
  for (const i of rows.flatMap((r) => r.images)) {
    const seen = byName.get(i.name);
    if (!seen || seen.created_at < i.created_at) byName.set(i.name, i);
  }
  return [...byName.values()];
}

/** GET /images: the tenant's, then hosts' (of other names); `tags` keeps only images having
 * every one of them (hosts' images have none). */
export async function listImages(
  s: Services,
  tenantId: string,
  tags: Record<string, string> = {},
): Promise<Image[]> {
  const own = (await tenantImages(s.db, tenantId)).map(presentTenant);
  const names = new Set(own.map((i) => i.name));
  const shared = (await hostImages(s.db, hostGrace(s)))
    .filter((i) => !names.has(i.name))
    .map(presentHost);
  const wanted = Object.entries(tags);
  return [...own, ...shared]
    .filter((i) => wanted.every(([k, v]) => i.tags?.[k] === v))
    .sort((a, b) => a.name.localeCompare(b.name));
}

function normalized(name: string): string {
  const n = normalizeImageRef(name);
  if (!n) throw new InvalidRequestError(`name: "${name}" is not an OCI image reference`);
  return n;
}

export async function getImage(s: Services, tenantId: string, name: string): Promise<Image> {
  const n = normalizeImageRef(name);
  if (n) {
    const [own] = await tenantImages(s.db, tenantId, n);
    if (own) return presentTenant(own);
    const shared = (await hostImages(s.db, hostGrace(s))).find((i) => i.name === n);
    if (shared) return presentHost(shared);
  }
  throw new NotFoundError(`image ${name} not found`);
}

/** Salted, so equal credentials are recognised without being kept. */
function credentialsHash(c: PushCredentials, salt = randomBytes(16).toString("hex")): string {
  const h = createHash("sha256")
    .update(salt)
    .update(JSON.stringify([c.username ?? "", c.password ?? "", c.registry_token ?? ""]))
    .digest("hex");
  return `${salt}$${h}`;
}
const sameCredentials = (stored: string | null, c: PushCredentials | undefined): boolean => {
  if (!stored || !c) return !stored && !c;
  return credentialsHash(c, stored.split("$")[0]) === stored;
};

/**
 * POST /images: 202 with the image as it is now. A pull of the name already in flight is
 * joined (409 if it was asked for with other credentials); otherwise a connected host is
 * chosen — the one with the fewest pulls queued, then the most free memory — and told to pull.
 * Credentials go to that host in the command and nowhere else.
 */
export async function pullImage(
  s: Services,
  tenantId: string,
  req: CreateImageRequest,
): Promise<Image> {
  const name = normalized(req.name);
  const platform = req.platform ?? "linux/amd64";
  if (!PLATFORM.test(platform)) {
    throw new ApiError("invalid_platform", `platform "${platform}" is not os/arch[/variant]`);
  }
  if (!PULLABLE.has(platform)) {
    throw new ApiError(
      "invalid_platform",
      `platform ${platform} is not available; images are pulled for ${[...PULLABLE].join(" or ")}`,
    );
  }
  const c = req.credentials;
  const credentials = c && (c.username || c.password || c.registry_token) ? c : undefined;
  const { row, op } = await transaction(s.db, async (tx) => {
    // Two requests for one name meet here: the second waits for the first's row.
    await tx.execute(
      sql`select pg_advisory_xact_lock(hashtextextended(${`image:${tenantId}:${name}`}, 0))`,
    );
    const [existing] = await tx
      .select()
      .from(images)
      .where(and(eq(images.tenantId, tenantId), eq(images.name, name)));
    // A pull in flight on a connected host is joined; one whose host is gone starts again
    // elsewhere (its result, should it come, is for an operation the row no longer names).
    const inFlight =
      existing &&
      (IN_FLIGHT as readonly string[]).includes(existing.status) &&
      existing.hostId !== null &&
      (
        await tx
          .select({ id: hosts.id })
          .from(hosts)
          .where(and(eq(hosts.id, existing.hostId), online(hostGrace(s))))
      ).length > 0;
    if (existing && inFlight) {
      if (!sameCredentials(existing.credentialsHash, credentials)) {
        throw new ConflictError(
          `an image pull of ${name} is already in flight with different credentials`,
        );
      }
      return { row: existing, op: undefined };
    }
    // Credentials cross to another replica only through the table, where they are not kept:
    // such a pull goes to a host whose agent is connected here, if there is one.
    const host = await pullHost(
      tx,
      hostGrace(s),
      (h) => !credentials || s.gateway.reachesDirectly(h.id),
    );
    const id = existing?.id ?? createImageId();
    const op = await s.ops.insert(tx, {
      tenantId,
      hostId: host.id,
      instanceId: null,
      lock: "none",
      payload: {
        kind: "image_pull",
        image_id: id,
        ref: name,
        platform,
        credentialed: !!credentials,
      },
    });
    const fields = {
      status: "pending" as const,
      error: null,
      platform,
      hostId: host.id,
      operationId: op.id,
      bytesDone: 0,
      bytesTotal: 0,
      credentialsHash: credentials ? credentialsHash(credentials) : null,
      requestedAt: new Date(),
      updatedAt: new Date(),
      ...(req.tags ? { tags: req.tags } : {}),
    };
    const [row] = existing
      ? await tx.update(images).set(fields).where(eq(images.id, existing.id)).returning()
      : await tx
          .insert(images)
          .values({ id, tenantId, name, ...fields })
          .returning();
    if (!row) throw new Error("image row not written");
    return { row, op };
  });
  if (op) s.ops.send(op, credentials ? { credentials } : undefined);
  s.log("info", "image pull requested", { image: name, host_id: row.hostId, joined: !op });
  const [now] = await tenantImages(s.db, tenantId, name);
  return presentTenant(now ?? { ...row, queuePosition: null });
}

const createImageId = () => `img_${randomBytes(12).toString("hex")}`;

/** The connected host with the fewest pulls in flight, then the most memory; `preferred` hosts
 * before any other. */
async function pullHost(
  ex: Executor,
  graceMs: number | null,
  preferred: (h: HostRow) => boolean,
): Promise<HostRow> {
  const candidates = await ex.select().from(hosts).where(online(graceMs));
  if (candidates.length === 0)
    throw new HostUnavailableError("no host is connected to pull images");
  const queued = await ex
    .select({ hostId: operations.hostId, n: count() })
    .from(operations)
    .where(and(eq(operations.kind, "image_pull"), eq(operations.status, "pending")))
    .groupBy(operations.hostId);
  const load = new Map(queued.map((q) => [q.hostId, q.n]));
  const [best] = candidates.sort(
    (a, b) =>
      Number(preferred(b)) - Number(preferred(a)) ||
      (load.get(a.id) ?? 0) - (load.get(b.id) ?? 0) ||
      b.memoryBytes - a.memoryBytes,
  );
  return best as HostRow;
}

/** DELETE /images/{name}: the tenant's name for it goes (hosts keep what they pulled until
 * their cache needs the room). 409 while one of the tenant's instances was made from it. */
export async function deleteImage(s: Services, tenantId: string, name: string): Promise<void> {
  const n = normalizeImageRef(name);
  const deleted = await transaction(s.db, async (tx) => {
    if (!n) return false;
    const [row] = await tx
      .select()
      .from(images)
      .where(and(eq(images.tenantId, tenantId), eq(images.name, n)))
      .for("update");
    if (!row) return false;
    const users = await tx
      .select({ name: instances.name })
      .from(instances)
      .where(eq(instances.imageId, row.id))
      .limit(3);
    if (users.length > 0) {
      throw new ConflictError(
        `image ${n} is used by instance${users.length > 1 ? "s" : ""} ${users.map((u) => u.name).join(", ")}${users.length === 3 ? " and maybe more" : ""}; delete them first`,
      );
    }
    await tx.delete(images).where(eq(images.id, row.id));
    return true;
  });
  if (deleted) return;
  if (n && (await hostImages(s.db, hostGrace(s))).some((i) => i.name === n)) {
    throw new ConflictError(
      `image ${n} was imported by its hosts (AGENT_IMAGES), not pulled through the API; it cannot be deleted here`,
    );
  }
  throw new NotFoundError(`image ${name} not found`);
}

/** What an instance of `image` boots: the tenant's pulled image (which must be ready), or else
 * a hosts' image of that name (undefined: see requireBootable). */
export async function imageForInstance(
  ex: Executor,
  tenantId: string,
  image: string,
): Promise<ImageRow | undefined> {
  const n = normalizeImageRef(image);
  if (!n) return undefined;
  const [row] = await ex
    .select()
    .from(images)
    .where(and(eq(images.tenantId, tenantId), eq(images.name, n)));
  if (!row) return undefined;
  if (row.status !== "ready" || !row.digest) {
    throw new ApiError(
      "image_not_ready",
      row.status === "failed"
        ? `image ${n} failed to pull (${row.error ?? "no reason given"}); pull it again`
        : `image ${n} is not ready (status ${row.status})`,
    );
  }
  if (row.platform !== "linux/amd64") {
    throw new ApiError("invalid_platform", `image ${n} is ${row.platform}; hosts run linux/amd64`);
  }
  return row;
}

/** Hosts that hold `digest` come first in placement. */
export const holdsDigest = (host: HostRow, digest: string) => host.imageDigests.includes(digest);

/** An agent's progress on a pull: written only while that pull is the row's current one. */
export async function imageProgress(ex: Executor, hostId: string, p: ImageProgress): Promise<void> {
  await ex
    .update(images)
    .set({
      status: p.phase,
      bytesDone: p.bytes_done,
      bytesTotal: p.bytes_total,
      updatedAt: new Date(),
    })
    .where(
      and(
        eq(images.id, p.image_id),
        eq(images.operationId, p.command_id),
        eq(images.hostId, hostId),
        inArray(images.status, [...IN_FLIGHT]),
      ),
    );
}

/** Why `host` cannot boot `image` (a hosts' image, by name), or undefined if it can (or needs
 * no images). */
export function lacksImage(host: HostRow, image: string): string | undefined {
  if (!host.capabilities?.images) return undefined;
  const n = normalizeImageRef(image);
  if (host.images.some((i) => i.name === n)) return undefined;
  return `image ${image} not found on host ${host.name}`;
}

/** Why `host` cannot boot a guest of `memoryBytes`, or undefined if it can. */
export function tooSmall(host: HostRow, memoryBytes: number): string | undefined {
  const min = host.capabilities?.min_memory_bytes ?? 0;
  return memoryBytes < min
    ? `size ${formatSize(memoryBytes)} is below the smallest guest host ${host.name} boots (${formatSize(min)})`
    : undefined;
}

/** 404 unless some connected host can boot hosts' image `image`; 400 if every host that has it
 * needs more memory than `memoryBytes` (checked before placement, which then only considers
 * hosts that can). A tenant's pulled image needs neither: any host can pull it. */
export async function requireBootable(
  db: Executor,
  graceMs: number | null,
  image: string,
  memoryBytes: number,
  pulled: boolean,
): Promise<void> {
  const candidates = await db.select().from(hosts).where(online(graceMs));
  if (candidates.length === 0) return; // placement says no host is connected
  const withImage = pulled ? candidates : candidates.filter((h) => !lacksImage(h, image));
  if (withImage.length === 0) {
    throw new NotFoundError(
      `image ${image} not found: pull it first (POST /images), or use one the hosts imported (GET /images)`,
    );
  }
  if (withImage.every((h) => tooSmall(h, memoryBytes))) {
    const min = Math.min(...withImage.map((h) => h.capabilities?.min_memory_bytes ?? 0));
    throw new InvalidRequestError(
      `size ${formatSize(memoryBytes)} is below the smallest guest the hosts boot (${formatSize(min)})`,
    );
  }
}
