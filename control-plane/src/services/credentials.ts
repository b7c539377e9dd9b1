import { createHash, randomBytes } from "node:crypto";
import { and, eq, gt, isNull, lt, ne } from "drizzle-orm";
import { type Db, transaction } from "../db/client.ts";
import { apiKeys, hosts, streamTokens, tenants } from "../db/schema/index.ts";
import { allocateHostSubnet } from "./network.ts";

// Secrets are shown once and stored only as SHA-256 hashes: a database dump reveals no key.
export const hashSecret = (secret: string) => createHash("sha256").update(secret).digest("hex");

/** How long a stream token (issueStreamToken) opens a WebSocket. */
export const STREAM_TOKEN_TTL_MS = 60_000;
const newSecret = (prefix: string) => `${prefix}_${randomBytes(24).toString("base64url")}`;

/** The token of an `Authorization: Bearer <token>` header (the scheme in any case, trailing
 * whitespace tolerated), or undefined. API keys and host tokens alike. */
export const bearerToken = (header: string | undefined): string | undefined =>
  /^Bearer\s+(\S+)\s*$/i.exec(header ?? "")?.[1];

export const DEFAULT_TENANT = "default";
/** The name of the key `HYPEMAN_API_KEY` makes at start-up. */
export const BOOTSTRAP_KEY = "HYPEMAN_API_KEY";

export async function ensureTenant(db: Db, name: string): Promise<string> {
  await db.insert(tenants).values({ name }).onConflictDoNothing({ target: tenants.name });
  const [row] = await db.select({ id: tenants.id }).from(tenants).where(eq(tenants.name, name));
  if (!row) throw new Error(`tenant ${name} vanished while being created`);
  return row.id;
}

/** Creates an API key for a tenant; `secret` imports a known key instead of generating one. */
export async function createApiKey(
  db: Db,
  tenantId: string,
  opts: { secret?: string; name?: string } = {},
): Promise<{ id: string; key: string }> {
  const key = opts.secret ?? newSecret("osk");
  const [row] = await db
    .insert(apiKeys)
    .values({ tenantId, keyHash: hashSecret(key), prefix: key.slice(0, 8), name: opts.name })
    .onConflictDoNothing({ target: apiKeys.keyHash })
    .returning({ id: apiKeys.id });
  if (row) return { id: row.id, key };
  const [existing] = await db
    .select({ id: apiKeys.id, tenantId: apiKeys.tenantId })
    .from(apiKeys)
    .where(eq(apiKeys.keyHash, hashSecret(key)));
  if (!existing || existing.tenantId !== tenantId) {
    throw new Error("that API key already belongs to another tenant");
  }
  return { id: existing.id, key };
}

export async function tenantHasKeys(db: Db, tenantId: string): Promise<boolean> {
  const rows = await db
    .select({ id: apiKeys.id })
    .from(apiKeys)
    .where(and(eq(apiKeys.tenantId, tenantId), isNull(apiKeys.revokedAt)))
    .limit(1);
  return rows.length > 0;
}

/** Revokes the tenant's keys named `name` except `keep`; returns how many. */
export async function revokeKeysNamed(
  db: Db,
  tenantId: string,
  name: string,
  keep: string,
): Promise<number> {
  const rows = await db
    .update(apiKeys)
    .set({ revokedAt: new Date() })
    .where(
      and(
        eq(apiKeys.tenantId, tenantId),
        eq(apiKeys.name, name),
        ne(apiKeys.id, keep),
        isNull(apiKeys.revokedAt),
      ),
    )
    .returning({ id: apiKeys.id });
  return rows.length;
}

export async function revokeApiKey(db: Db, keyId: string): Promise<boolean> {
  const rows = await db
    .update(apiKeys)
    .set({ revokedAt: new Date() })
    .where(and(eq(apiKeys.id, keyId), isNull(apiKeys.revokedAt)))
    .returning({ id: apiKeys.id });
  return rows.length > 0;
}

/** Registers a host and returns the token its agent must present. */
export async function createHost(
  db: Db,
  name: string,
  opts: { token?: string } = {},
): Promise<{ id: string; token: string }> {
  const token = opts.token ?? newSecret("oht");
  // A host registered again keeps its subnet (its guests' addresses are in it).
  const [row] = await transaction(db, async (tx) =>
    tx
      .insert(hosts)
      .values({ name, tokenHash: hashSecret(token), subnet: await allocateHostSubnet(tx) })
      .onConflictDoUpdate({ target: hosts.name, set: { tokenHash: hashSecret(token) } })
      .returning({ id: hosts.id }),
  );
  if (!row) throw new Error(`could not register host ${name}`);
  return { id: row.id, token };
}

interface CacheEntry<T> {
  value: T;
  expires: number;
}

/**
 * Resolves API keys and host tokens. Positive answers are cached for a few seconds so that a
 * busy client costs one hash, not one query, per request; a revoked key stops working within
 * `ttlMs`.
 */
export class Credentials {
  private keys = new Map<string, CacheEntry<string>>();
  constructor(
    private db: Db,
    private ttlMs = 5000,
  ) {}

  async tenantForKey(key: string): Promise<string | undefined> {
    const hash = hashSecret(key);
    const hit = this.keys.get(hash);
    if (hit && hit.expires > Date.now()) return hit.value;
    const [row] = await this.db
      .select({ tenantId: apiKeys.tenantId })
      .from(apiKeys)
      .where(and(eq(apiKeys.keyHash, hash), isNull(apiKeys.revokedAt)));
    if (!row) {
      this.keys.delete(hash);
      return undefined;
    }
    if (this.keys.size > 10_000) this.keys.clear();
    this.keys.set(hash, { value: row.tenantId, expires: Date.now() + this.ttlMs });
    return row.tenantId;
  }

  /** A short-lived, single-use token opening one exec or cp WebSocket for `tenantId` (for
   * browsers, which cannot send the API key on a WebSocket). Expired ones are removed here. */
  async issueStreamToken(tenantId: string): Promise<{ token: string; expires_at: string }> {
    const token = `ost_${randomBytes(24).toString("base64url")}`;
    const expiresAt = new Date(Date.now() + STREAM_TOKEN_TTL_MS);
    await this.db.delete(streamTokens).where(lt(streamTokens.expiresAt, new Date()));
    await this.db
      .insert(streamTokens)
      .values({ tokenHash: hashSecret(token), tenantId, expiresAt });
    return { token, expires_at: expiresAt.toISOString() };
  }

  /** The tenant of a stream token still valid; the token is spent. */
  async tenantForStreamToken(token: string): Promise<string | undefined> {
    const [row] = await this.db
      .delete(streamTokens)
      .where(
        and(eq(streamTokens.tokenHash, hashSecret(token)), gt(streamTokens.expiresAt, new Date())),
      )
      .returning({ tenantId: streamTokens.tenantId });
    return row?.tenantId;
  }

  async hostForToken(token: string): Promise<{ id: string; name: string } | undefined> {
    const [row] = await this.db
      .select({ id: hosts.id, name: hosts.name })
      .from(hosts)
      .where(eq(hosts.tokenHash, hashSecret(token)));
    return row;
  }
}
