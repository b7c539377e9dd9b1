// Volumes: a tenant's ext4 disks, each on one host, attached to instances there. Made and
// removed by host commands (volume_create, volume_delete); attachments are the instances'
// `volumes`, checked here when an instance is created:
// - mount paths absolute, normalized, distinct, and not /, /proc, /sys, /dev or below those;
// - a volume attached writable is attached nowhere else, and one attached anywhere is attached
//   again only read-only (any number of read-only attachments);
// - every volume of an instance is on one host, where the instance is then placed.

import {
  ConflictError,
  type CreateVolumeRequest,
  HostUnavailableError,
  InvalidRequestError,
  NotFoundError,
  TimeoutError,
  type Volume,
  type VolumeMount,
} from "@offshoot/shared";
import { createId } from "@paralleldrive/cuid2";
import { and, asc, eq, sql } from "drizzle-orm";
import { type Executor, pgErrorCode, transaction } from "../db/client.ts";
import {
  hosts,
  instances,
  operations,
  type VolumeRow,
  volumeArchives,
  volumes,
} from "../db/schema/index.ts";
import { type Call, hostGrace, newCall, type Services } from "./context.ts";
import { online } from "./placement.ts";

const GiB = 1024 ** 3;
const FORBIDDEN = ["/proc", "/sys", "/dev"];

/** A volume mount as an instance row keeps it: the request's, plus the volume's host key. */
export type StoredMount = VolumeMount & { key?: string };

async function attachmentsOf(ex: Executor, tenantId: string, id: string) {
  const rows = await ex
    .select({ id: instances.id, volumes: instances.volumes })
    .from(instances)
    .where(
      and(
        eq(instances.tenantId, tenantId),
        sql`${instances.volumes} @> ${JSON.stringify([{ volume_id: id }])}::jsonb`,
      ),
    );
  return rows.flatMap((r) =>
    r.volumes
      .filter((v) => v.volume_id === id)
      .map((v) => ({ instance_id: r.id, mount_path: v.mount_path, readonly: !!v.readonly })),
  );
}

async function present(ex: Executor, v: VolumeRow): Promise<Volume> {
  return {
    id: v.id,
    name: v.name,
    size_gb: Math.round(v.sizeBytes / GiB),
    attachments: await attachmentsOf(ex, v.tenantId, v.id),
    tags: v.tags,
    created_at: v.createdAt.toISOString(),
  };
}

async function find(ex: Executor, tenantId: string, id: string): Promise<VolumeRow> {
  const [v] = await ex
    .select()
    .from(volumes)
    .where(and(eq(volumes.tenantId, tenantId), eq(volumes.id, id)));
  if (!v) throw new NotFoundError(`volume ${id} not found`);
  return v;
}

/** POST /volumes: made on a connected host (the one with the most memory, where instances are
 * likeliest to fit), 201 once it exists there. */
export async function createVolume(
  s: Services,
  tenantId: string,
  req: CreateVolumeRequest,
  call: Call = newCall(s),
  archive?: { id: string; bytes: number },
): Promise<Volume> {
  const id = req.id ?? `vol-${createId()}`;
  const op = await transaction(s.db, async (tx) => {
    await requireFreeId(tx, tenantId, id);
    const [host] = await tx
      .select()
      .from(hosts)
      .where(and(online(hostGrace(s)), sql`(${hosts.capabilities}->>'volumes')::boolean`))
      .orderBy(sql`${hosts.memoryBytes} desc`)
      .limit(1);
    if (!host) throw new HostUnavailableError("no connected host can hold volumes");
    const key = createId();
    await tx.insert(volumes).values({
      key,
      tenantId,
      id,
      name: req.name,
      sizeBytes: req.size_gb * GiB,
      tags: req.tags ?? {},
      hostId: host.id,
    });
    return s.ops.insert(tx, {
      tenantId,
      hostId: host.id,
      instanceId: null,
      lock: "none",
      payload: {
        kind: "volume_create",
        key,
        size_bytes: req.size_gb * GiB,
        ...(archive ? { archive } : {}),
      },
    });
  }).catch((e: unknown) => {
    // Two requests for one id: the unique index answers the second.
    const { code, constraint } = pgErrorCode(e);
    if (code === "23505" && (constraint === undefined || constraint === "volumes_tenant_id_uq")) {
      throw new ConflictError(`volume ${id} already exists`);
    }
    throw e;
  });
  try {
    await s.ops.run(op, call);
  } catch (e) {
    // Not made on the host: no volume. (Out of time, it may still be made: kept.)
    if (!(e instanceof TimeoutError)) {
      await s.db.delete(volumes).where(and(eq(volumes.tenantId, tenantId), eq(volumes.id, id)));
    }
    throw e;
  }
  return present(s.db, await find(s.db, tenantId, id));
}

async function requireFreeId(ex: Executor, tenantId: string, id: string): Promise<void> {
  const [taken] = await ex
    .select({ id: volumes.id })
    .from(volumes)
    .where(and(eq(volumes.tenantId, tenantId), eq(volumes.id, id)));
  if (taken) throw new ConflictError(`volume ${id} already exists`);
}

/** The largest archive POST /volumes/from-archive takes (compressed), and the pieces it is kept
 * in until its host has unpacked it. */
export const ARCHIVE_MAX_BYTES = 256 * 1024 * 1024;
export const ARCHIVE_CHUNK_BYTES = 1024 * 1024;

/**
 * POST /volumes/from-archive: the body (a tar.gz) is read as it arrives into chunks in
 * Postgres — never whole in memory — refused past `maxBytes` or when it is not gzip; then the
 * volume is made as POST /volumes makes one, and its host fetches the archive and unpacks it
 * into it (confined, as image layers are). The chunks go once the host has answered.
 */
export async function createVolumeFromArchive(
  s: Services,
  tenantId: string,
  req: CreateVolumeRequest,
  body: ReadableStream<Uint8Array> | null,
  maxBytes = ARCHIVE_MAX_BYTES,
): Promise<Volume> {
  const call = newCall(s);
  const id = req.id ?? `vol-${createId()}`;
  await requireFreeId(s.db, tenantId, id);
  if (!body) throw new InvalidRequestError("the request has no body: send the tar.gz as it");
  const archiveId = createId();
  let bytes = 0;
  const reader = (body as unknown as AsyncIterable<Uint8Array>)[Symbol.asyncIterator]();
  try {
    let seq = 0;
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    const flush = async () => {
      if (pendingBytes === 0) return;
      await s.db.insert(volumeArchives).values({
        archiveId,
        seq: seq++,
        data: Buffer.concat(pending),
      });
      pending = [];
      pendingBytes = 0;
    };
    for (let r = await reader.next(); !r.done; r = await reader.next()) {
      const b = Buffer.from(r.value);
      if (bytes === 0 && !(b[0] === 0x1f && (b.length < 2 || b[1] === 0x8b))) {
        throw new InvalidRequestError("the archive is not gzip (expected a tar.gz)");
      }
      bytes += b.length;
      if (bytes > maxBytes) {
        throw new InvalidRequestError(`the archive is over the ${maxBytes}-byte limit`);
      }
      pending.push(b);
      pendingBytes += b.length;
      if (pendingBytes >= ARCHIVE_CHUNK_BYTES) await flush();
    }
    await flush();
    if (bytes === 0) throw new InvalidRequestError("the archive is empty");
    return await createVolume(s, tenantId, { ...req, id }, call, { id: archiveId, bytes });
  } catch (e) {
    // Read on (discarding, up to the limit again) so the client is sent this answer rather
    // than a reset while it is still sending.
    let drained = 0;
    try {
      for (let r = await reader.next(); !r.done && drained <= maxBytes; r = await reader.next()) {
        drained += r.value.length;
      }
    } catch {
      // the client went away: nothing to answer
    }
    throw e;
  } finally {
    await s.db.delete(volumeArchives).where(eq(volumeArchives.archiveId, archiveId));
  }
}

/**
 * An archive's chunks, in order, for the host a pending volume_create sent it to (undefined
 * for any other host, or once that command has finished): read one chunk at a time.
 */
export async function archiveForHost(
  s: Services,
  hostId: string,
  archiveId: string,
): Promise<AsyncIterable<Buffer> | undefined> {
  const [op] = await s.db
    .select({ id: operations.id })
    .from(operations)
    .where(
      and(
        eq(operations.hostId, hostId),
        eq(operations.kind, "volume_create"),
        eq(operations.status, "pending"),
        sql`${operations.payload}->'archive'->>'id' = ${archiveId}`,
      ),
    );
  if (!op) return undefined;
  return (async function* () {
    for (let seq = 0; ; seq++) {
      const [row] = await s.db
        .select({ data: volumeArchives.data })
        .from(volumeArchives)
        .where(and(eq(volumeArchives.archiveId, archiveId), eq(volumeArchives.seq, seq)));
      if (!row) return;
      yield Buffer.from(row.data);
    }
  })();
}

export async function listVolumes(
  s: Services,
  tenantId: string,
  tags: Record<string, string> = {},
): Promise<Volume[]> {
  const rows = await s.db
    .select()
    .from(volumes)
    .where(
      and(
        eq(volumes.tenantId, tenantId),
        Object.keys(tags).length
          ? sql`${volumes.tags} @> ${JSON.stringify(tags)}::jsonb`
          : undefined,
      ),
    )
    .orderBy(asc(volumes.createdAt));
  return Promise.all(rows.map((v) => present(s.db, v)));
}

export async function getVolume(s: Services, tenantId: string, id: string): Promise<Volume> {
  return present(s.db, await find(s.db, tenantId, id));
}

/** DELETE /volumes/{id}: 409 while attached; the file goes with it on its host. */
export async function deleteVolume(s: Services, tenantId: string, id: string): Promise<void> {
  const op = await transaction(s.db, async (tx) => {
    const [v] = await tx
      .select()
      .from(volumes)
      .where(and(eq(volumes.tenantId, tenantId), eq(volumes.id, id)))
      .for("update");
    if (!v) throw new NotFoundError(`volume ${id} not found`);
    const attached = await attachmentsOf(tx, tenantId, id);
    if (attached.length > 0) {
      throw new ConflictError(
        `volume ${id} is attached to ${attached.map((a) => a.instance_id).join(", ")}; delete or stop using those instances first`,
      );
    }
    await tx.delete(volumes).where(eq(volumes.key, v.key));
    return s.ops.insert(tx, {
      tenantId,
      hostId: v.hostId,
      instanceId: null,
      lock: "none",
      payload: { kind: "volume_delete", key: v.key },
    });
  });
  // The row is gone: the host removes the file when it gets the command (now, or after it
  // reconnects).
  s.ops.send(op);
}

/** A mount path as the guest will see it (VolumeMount has made sure it is absolute): without
 * ., .. or repeated slashes. */
function checkMountPath(p: string): string {
  const parts = p.split("/").filter(Boolean);
  if (parts.some((x) => x === "." || x === "..")) {
    throw new InvalidRequestError(`mount_path ${p} must not contain . or ..`);
  }
  if (parts.some((x) => /[\0\n]/.test(x))) {
    throw new InvalidRequestError(`mount_path ${p} has a character a path cannot hold`);
  }
  const norm = `/${parts.join("/")}`;
  if (norm === "/") throw new InvalidRequestError("mount_path / would hide the image's root");
  const bad = FORBIDDEN.find((f) => norm === f || norm.startsWith(`${f}/`));
  if (bad)
    throw new InvalidRequestError(`mount_path ${p} is under ${bad}, which the guest's kernel owns`);
  return norm;
}

/**
 * An instance's volume mounts, checked (see the top of this file), with each volume's key,
 * and the host they all live on (null when there are none). Read inside the create's
 * transaction; each volume row is locked so two creates cannot both take a writable one.
 */
export async function resolveMounts(
  tx: Executor,
  tenantId: string,
  mounts: VolumeMount[],
): Promise<{ mounts: StoredMount[]; hostId: string | null }> {
  const seen = new Set<string>();
  const out: StoredMount[] = [];
  let hostId: string | null = null;
  for (const m of mounts) {
    const mountPath = checkMountPath(m.mount_path);
    if (seen.has(mountPath)) throw new InvalidRequestError(`mount_path ${mountPath} is used twice`);
    seen.add(mountPath);
    const [v] = await tx
      .select()
      .from(volumes)
      .where(and(eq(volumes.tenantId, tenantId), eq(volumes.id, m.volume_id)))
      .for("update");
    if (!v) throw new NotFoundError(`volume ${m.volume_id} not found`);
    if (hostId !== null && v.hostId !== hostId) {
      throw new InvalidRequestError(
        `volumes ${mounts.map((x) => x.volume_id).join(", ")} live on different hosts; an instance attaches volumes of one host`,
      );
    }
    hostId = v.hostId;
    const readonly = !!(m.readonly || m.overlay);
    if (out.some((o) => o.volume_id === m.volume_id && (!readonly || !o.readonly))) {
      throw new ConflictError(
        `volume ${m.volume_id} is attached twice, and not read-only both times`,
      );
    }
    const others = await attachmentsOf(tx, tenantId, m.volume_id);
    const writable = others.find((a) => !a.readonly);
    if (writable) {
      throw new ConflictError(
        `volume ${m.volume_id} is attached writable to ${writable.instance_id}; it can be attached elsewhere only once that instance is gone`,
      );
    }
    if (!readonly && others.length > 0) {
      throw new ConflictError(
        `volume ${m.volume_id} is attached to ${others.map((a) => a.instance_id).join(", ")}; a volume attached more than once must be read-only everywhere`,
      );
    }
    out.push({ ...m, mount_path: mountPath, readonly: m.readonly ?? false, key: v.key });
  }
  return { mounts: out, hostId };
}
