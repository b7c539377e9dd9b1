// A client for the OCI Distribution API v2 (https://github.com/opencontainers/distribution-spec):
// what an image pull needs of a registry — resolve a reference to one platform's manifest, read
// its config, and stream blobs to disk with their digests verified on the way.
//
// Written on Node's fetch rather than taken from npm: the kept client there
// (@snyk/docker-registry-v2-client) reports a manifest digest computed from re-serialised JSON
// (not the bytes the registry sent), verifies no blob, and streams layers to a file with no hook
// for hashing, progress or a size limit — the parts a pull must get right. Authentication
// follows the registry's WWW-Authenticate challenge: Bearer (a token from the realm, with basic
// credentials when given, or a caller's own `registry_token`) or Basic.
import { createHash } from "node:crypto";
import { createWriteStream } from "node:fs";
import { rename, rm } from "node:fs/promises";
import { pipeline } from "node:stream/promises";
import { DIGEST } from "@offshoot/shared";
import { z } from "zod";

export interface RegistryCredentials {
  username?: string;
  password?: string;
  /** Used as the Bearer token as it is (no token exchange). */
  registry_token?: string;
}

export interface RegistryOptions {
  credentials?: RegistryCredentials;
  /** Longest silence from the registry (no header, no body byte) before a request fails. */
  idleTimeoutMs?: number;
  /** Registries reached over plain HTTP (host[:port]); loopback always is, as in Docker. */
  insecure?: readonly string[];
  /** Largest layer accepted (compressed, as the manifest gives its size). */
  maxLayerBytes?: number;
}

/** A pull that cannot succeed as asked: its message is what the image's `error` says. */
export class PullError extends Error {
  constructor(
    message: string,
    /** The registry's HTTP status, when the failure is its answer. */
    readonly status?: number,
  ) {
    super(message);
    this.name = "PullError";
  }
}

/** Manifests, indexes and configs are small documents; anything larger is refused unread. */
export const MAX_DOCUMENT_BYTES = 4 * 1024 * 1024;
const MAX_REDIRECTS = 5;

export const MEDIA = {
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  ociIndex: "application/vnd.oci.image.index.v1+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  dockerList: "application/vnd.docker.distribution.manifest.list.v2+json",
} as const;
export const INDEX_TYPES: ReadonlySet<string> = new Set([MEDIA.ociIndex, MEDIA.dockerList]);
const MANIFEST_TYPES: ReadonlySet<string> = new Set([MEDIA.ociManifest, MEDIA.dockerManifest]);
const ACCEPT = [MEDIA.ociIndex, MEDIA.dockerList, MEDIA.ociManifest, MEDIA.dockerManifest].join(
  ", ",
);

/** How a layer blob is compressed, by its media type; undefined: not a layer we unpack. */
export function layerCompression(mediaType: string): "gzip" | "zstd" | "tar" | undefined {
  switch (mediaType) {
    case "application/vnd.oci.image.layer.v1.tar+gzip":
    case "application/vnd.docker.image.rootfs.diff.tar.gzip":
      return "gzip";
    case "application/vnd.oci.image.layer.v1.tar+zstd":
      return "zstd";
    case "application/vnd.oci.image.layer.v1.tar":
      return "tar";
    default:
      return undefined;
  }
}

export const Descriptor = z.object({
  mediaType: z.string(),
  digest: z.string().regex(DIGEST, "only sha256 digests are supported"),
  size: z.number().int().nonnegative(),
  platform: z
    .object({ os: z.string(), architecture: z.string(), variant: z.string().optional() })
    .optional(),
  annotations: z.record(z.string(), z.string()).optional(),
});
export type Descriptor = z.infer<typeof Descriptor>;
export const IndexDoc = z.object({
  mediaType: z.string().optional(),
  manifests: z.array(Descriptor),
});
export const ManifestDoc = z.object({
  mediaType: z.string().optional(),
  config: Descriptor,
  layers: z.array(Descriptor),
});
export type ManifestDoc = z.infer<typeof ManifestDoc>;
export const ConfigDoc = z.object({
  architecture: z.string().optional(),
  os: z.string().optional(),
  variant: z.string().optional(),
  config: z
    .object({
      Env: z.array(z.string()).nullish(),
      Entrypoint: z.array(z.string()).nullish(),
      Cmd: z.array(z.string()).nullish(),
      WorkingDir: z.string().nullish(),
      User: z.string().nullish(),
    })
    .nullish(),
});
export type ConfigDoc = z.infer<typeof ConfigDoc>;

/** "linux/amd64[/variant]" as its parts. */
export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
}
export function parsePlatform(p: string): Platform {
  const [os = "", architecture = "", variant] = p.split("/");
  return variant ? { os, architecture, variant } : { os, architecture };
}
export const platformString = (p: Platform) =>
  [p.os, p.architecture, p.variant].filter(Boolean).join("/");

/** A normalized reference's parts: registry host, repository, and a tag or digest. */
export interface Reference {
  registry: string;
  repository: string;
  /** The tag, or the digest when the reference pins one. */
  reference: string;
}
export function splitReference(normalized: string): Reference {
  const slash = normalized.indexOf("/");
  const registry = normalized.slice(0, slash);
  let rest = normalized.slice(slash + 1);
  let reference: string;
  const at = rest.indexOf("@");
  if (at >= 0) {
    reference = rest.slice(at + 1);
    rest = rest.slice(0, at);
    const colon = rest.lastIndexOf(":");
    if (colon >= 0) rest = rest.slice(0, colon);
  } else {
    const colon = rest.lastIndexOf(":");
    reference = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
  }
  return { registry, repository: rest, reference };
}

export interface ResolvedImage {
  /** The platform manifest's digest: what names the image's rootfs. */
  digest: string;
  manifest: ManifestDoc;
  config: ConfigDoc;
  platform: string;
}

type Challenge = { scheme: "bearer"; realm: string; service?: string } | { scheme: "basic" };

/** One registry, one repository: the scope every token it asks for is for. */
export class RegistryClient {
  private readonly base: string;
  private readonly scope: string;
  private authorization: string | undefined;
  private readonly idleMs: number;

  constructor(
    private readonly ref: Reference,
    private readonly options: RegistryOptions = {},
  ) {
    const host = ref.registry === "docker.io" ? "registry-1.docker.io" : ref.registry;
    const plain =
      /^(localhost|127\.\d+\.\d+\.\d+|\[::1\])(:\d+)?$/.test(host) ||
      (options.insecure ?? []).includes(host);
    this.base = `${plain ? "http" : "https"}://${host}/v2/${ref.repository}`;
    this.scope = `repository:${ref.repository}:pull`;
    this.idleMs = options.idleTimeoutMs ?? 30_000;
    const token = options.credentials?.registry_token;
    if (token) this.authorization = `Bearer ${token}`;
  }

  /** The reference's manifest for `platform` (an index is followed to its entry), and its
   * config. Every document is checked against the digest that names it. */
  async resolve(platform: Platform): Promise<ResolvedImage> {
    let { bytes, type } = await this.manifest(this.ref.reference);
    let digest = sha256(bytes);
    if (DIGEST.test(this.ref.reference) && digest !== this.ref.reference) {
      throw new PullError(`manifest ${this.ref.reference} does not match its digest`);
    }
    if (INDEX_TYPES.has(type)) {
      const index = parseDoc(IndexDoc, bytes, "image index");
      const entry = pickPlatform(index.manifests, platform);
      ({ bytes, type } = await this.manifest(entry.digest));
      digest = sha256(bytes);
      if (digest !== entry.digest) {
        throw new PullError(`manifest ${entry.digest} does not match its digest`);
      }
    }
    if (!MANIFEST_TYPES.has(type)) {
      throw new PullError(`unsupported manifest type ${type || "(none)"}`);
    }
    const manifest = parseDoc(ManifestDoc, bytes, "manifest");
    const config = parseDoc(ConfigDoc, await this.document(manifest.config), "image config");
    const got: Platform = {
      os: config.os ?? "linux",
      architecture: config.architecture ?? "amd64",
      ...(config.variant ? { variant: config.variant } : {}),
    };
    if (got.os !== platform.os || got.architecture !== platform.architecture) {
      throw new PullError(
        `image is ${platformString(got)}, not the requested ${platformString(platform)}`,
      );
    }
    for (const l of manifest.layers) {
      if (!layerCompression(l.mediaType))
        throw new PullError(`unsupported layer type ${l.mediaType}`);
    }
    return { digest, manifest, config, platform: platformString(got) };
  }

  /**
   * Streams blob `d` into `file` (through `file`.partial, renamed only once its size and
   * sha256 match `d`). `onBytes` hears each chunk's length.
   */
  async download(d: Descriptor, file: string, onBytes: (n: number) => void): Promise<void> {
    const max = this.options.maxLayerBytes;
    if (max !== undefined && d.size > max) {
      throw new PullError(`layer ${d.digest} is ${d.size} bytes, over the ${max}-byte layer limit`);
    }
    const partial = `${file}.partial`;
    const res = await this.get(`/blobs/${d.digest}`, "*/*");
    const hash = createHash("sha256");
    let size = 0;
    const body = this.body(res, d.digest);
    async function* checked() {
      for await (const chunk of body) {
        size += chunk.length;
        if (size > d.size) {
          throw new PullError(`blob ${d.digest} is longer than its ${d.size} bytes`);
        }
        hash.update(chunk);
        onBytes(chunk.length);
        yield chunk;
      }
    }
    try {
      // pipeline closes the file on every path, before this goes on.
      await pipeline(checked(), createWriteStream(partial));
      if (size !== d.size) {
        throw new PullError(`blob ${d.digest} ended after ${size} of ${d.size} bytes`);
      }
      if (`sha256:${hash.digest("hex")}` !== d.digest) {
        throw new PullError(`blob ${d.digest} does not match its digest (corrupt)`);
      }
      await rename(partial, file);
    } catch (e) {
      await rm(partial, { force: true });
      throw e;
    }
  }

  private async manifest(reference: string): Promise<{ bytes: Buffer; type: string }> {
    const res = await this.get(`/manifests/${reference}`, ACCEPT);
    const bytes = await this.readBounded(res, `manifest ${reference}`);
    const type =
      res.headers.get("content-type")?.split(";")[0]?.trim() ||
      (JSON.parse(bytes.toString("utf8")) as { mediaType?: string }).mediaType ||
      "";
    return { bytes, type };
  }

  /** A small blob (a config), verified. */
  private async document(d: Descriptor): Promise<Buffer> {
    if (d.size > MAX_DOCUMENT_BYTES) {
      throw new PullError(
        `${d.digest} is ${d.size} bytes; documents are limited to ${MAX_DOCUMENT_BYTES}`,
      );
    }
    const bytes = await this.readBounded(await this.get(`/blobs/${d.digest}`, "*/*"), d.digest);
    if (bytes.length !== d.size || sha256(bytes) !== d.digest) {
      throw new PullError(`blob ${d.digest} does not match its digest (corrupt)`);
    }
    return bytes;
  }

  private async readBounded(res: Response, what: string): Promise<Buffer> {
    const chunks: Buffer[] = [];
    let n = 0;
    for await (const chunk of this.body(res, what)) {
      n += chunk.length;
      if (n > MAX_DOCUMENT_BYTES) {
        throw new PullError(`${what} is over ${MAX_DOCUMENT_BYTES} bytes; refused`);
      }
      chunks.push(chunk);
    }
    return Buffer.concat(chunks);
  }

  /** The body's chunks, failing when the registry goes quiet for `idleMs`. */
  private async *body(res: Response, what: string): AsyncGenerator<Buffer> {
    if (!res.body) return;
    const reader = res.body.getReader();
    try {
      for (;;) {
        const r = await withIdle(
          reader.read(),
          this.idleMs,
          () =>
            new PullError(
              `registry stopped answering while sending ${what} (no data for ${this.idleMs} ms)`,
            ),
          () => void reader.cancel().catch(() => {}),
        );
        if (r.done) return;
        yield Buffer.from(r.value);
      }
    } catch (e) {
      if (e instanceof PullError) throw e;
      throw new PullError(`connection to the registry failed while reading ${what}: ${causeOf(e)}`);
    } finally {
      reader.releaseLock();
    }
  }

  /** GET with the registry's auth challenge answered once, redirects followed (credentials are
   * never sent to another origin), and errors as the registry words them. */
  private async get(pathname: string, accept: string): Promise<Response> {
    let res = await this.fetchFollowing(`${this.base}${pathname}`, accept, true);
    if (res.status === 401) {
      const challenge = parseChallenge(res.headers.get("www-authenticate"));
      await res.body?.cancel();
      await this.authenticate(challenge);
      res = await this.fetchFollowing(`${this.base}${pathname}`, accept, true);
      if (res.status === 401) {
        await res.body?.cancel();
        throw new PullError(
          this.options.credentials
            ? `registry refused the credentials for ${this.ref.repository} (401)`
            : `registry requires credentials for ${this.ref.repository} (401)`,
          401,
        );
      }
    }
    if (res.ok) return res;
    const detail = await registryError(res);
    if (res.status === 404) {
      throw new PullError(
        `${this.ref.registry}/${this.ref.repository}${pathname.startsWith("/manifests/") ? `:${pathname.slice(11)}` : ` ${pathname}`} not found in the registry (404${detail})`,
        404,
      );
    }
    if (res.status === 403)
      throw new PullError(`registry denied access to ${this.ref.repository} (403${detail})`, 403);
    if (res.status === 429) throw new PullError(`registry rate limit exceeded (429${detail})`, 429);
    throw new PullError(`registry answered ${res.status}${detail}`, res.status);
  }

  private async fetchFollowing(
    url: string,
    accept: string,
    sameOrigin: boolean,
    hops = 0,
  ): Promise<Response> {
    const headers: Record<string, string> = { accept };
    if (sameOrigin && this.authorization) headers.authorization = this.authorization;
    const ac = new AbortController();
    let res: Response;
    try {
      res = await withIdle(
        fetch(url, { headers, redirect: "manual", signal: ac.signal }),
        this.idleMs,
        () => new PullError(`registry stopped answering (no response in ${this.idleMs} ms)`),
        () => ac.abort(),
      );
    } catch (e) {
      if (e instanceof PullError) throw e;
      throw new PullError(`cannot reach registry ${new URL(url).host}: ${causeOf(e)}`);
    }
    if (res.status >= 300 && res.status < 400 && res.headers.get("location")) {
      await res.body?.cancel();
      if (hops >= MAX_REDIRECTS)
        throw new PullError(`registry redirected more than ${MAX_REDIRECTS} times`);
      const next = new URL(res.headers.get("location") as string, url);
      const same = sameOrigin && next.origin === new URL(this.base).origin;
      return this.fetchFollowing(next.toString(), accept, same, hops + 1);
    }
    return res;
  }

  private async authenticate(challenge: Challenge | undefined): Promise<void> {
    const c = this.options.credentials ?? {};
    if (!challenge)
      throw new PullError("registry answered 401 without a WWW-Authenticate challenge", 401);
    if (challenge.scheme === "basic") {
      if (!c.username)
        throw new PullError(`registry requires credentials for ${this.ref.repository} (401)`, 401);
      this.authorization = basicAuth(c);
      return;
    }
    if (c.registry_token) {
      // The caller's token was refused as it is; nothing to exchange it for.
      throw new PullError(
        `registry refused the registry_token for ${this.ref.repository} (401)`,
        401,
      );
    }
    const url = new URL(challenge.realm);
    if (challenge.service) url.searchParams.set("service", challenge.service);
    url.searchParams.set("scope", this.scope);
    const headers: Record<string, string> = {};
    if (c.username) {
      headers.authorization = basicAuth(c);
    }
    let res: Response;
    const ac = new AbortController();
    try {
      res = await withIdle(
        fetch(url, { headers, signal: ac.signal }),
        this.idleMs,
        () => new PullError(`token service ${url.host} stopped answering`),
        () => ac.abort(),
      );
    } catch (e) {
      if (e instanceof PullError) throw e;
      throw new PullError(`cannot reach the registry's token service ${url.host}: ${causeOf(e)}`);
    }
    if (res.status === 401 || res.status === 403) {
      await res.body?.cancel();
      throw new PullError(
        `registry refused the credentials for ${this.ref.repository} (${res.status} from its token service)`,
        401,
      );
    }
    if (!res.ok) {
      await res.body?.cancel();
      throw new PullError(`the registry's token service answered ${res.status}`, res.status);
    }
    const body = z
      .object({ token: z.string().optional(), access_token: z.string().optional() })
      .safeParse(JSON.parse((await this.readBounded(res, "token")).toString("utf8")));
    const token = body.success ? (body.data.token ?? body.data.access_token) : undefined;
    if (!token) throw new PullError("the registry's token service sent no token");
    this.authorization = `Bearer ${token}`;
  }
}

const basicAuth = (c: RegistryCredentials) =>
  `Basic ${Buffer.from(`${c.username}:${c.password ?? ""}`).toString("base64")}`;

/** The entry of an index for `want`; a single entry with no platform is taken as it is. */
function pickPlatform(entries: Descriptor[], want: Platform): Descriptor {
  const runnable = entries.filter(
    (e) => MANIFEST_TYPES.has(e.mediaType) || INDEX_TYPES.has(e.mediaType),
  );
  const match = runnable.filter(
    (e) =>
      e.platform?.os === want.os &&
      e.platform.architecture === want.architecture &&
      (!want.variant || e.platform.variant === want.variant),
  );
  const found =
    match[0] ?? (runnable.length === 1 && !runnable[0]?.platform ? runnable[0] : undefined);
  if (!found) {
    const offered = entries.flatMap((e) => (e.platform ? [platformString(e.platform)] : []));
    throw new PullError(
      `no ${platformString(want)} manifest in the image index (it has ${offered.join(", ") || "none"})`,
      404,
    );
  }
  return found;
}

function parseDoc<T>(schema: z.ZodType<T>, bytes: Buffer, what: string): T {
  let json: unknown;
  try {
    json = JSON.parse(bytes.toString("utf8"));
  } catch {
    throw new PullError(`${what} is not JSON`);
  }
  const parsed = schema.safeParse(json);
  if (!parsed.success)
    throw new PullError(`${what} is malformed: ${parsed.error.issues[0]?.message ?? ""}`);
  return parsed.data;
}

/** `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`. */
export function parseChallenge(header: string | null): Challenge | undefined {
  if (!header) return undefined;
  const m = /^\s*(\w+)\s*(.*)$/.exec(header);
  if (!m) return undefined;
  const scheme = m[1]?.toLowerCase();
  const params: Record<string, string> = {};
  for (const p of (m[2] ?? "").matchAll(/(\w+)\s*=\s*(?:"([^"]*)"|([^,\s]*))/g)) {
    params[(p[1] ?? "").toLowerCase()] = p[2] ?? p[3] ?? "";
  }
  if (scheme === "basic") return { scheme: "basic" };
  if (scheme === "bearer" && params.realm) {
    return {
      scheme: "bearer",
      realm: params.realm,
      ...(params.service ? { service: params.service } : {}),
    };
  }
  return undefined;
}

/** ": CODE message" from the registry's error body, if it sent one. */
async function registryError(res: Response): Promise<string> {
  try {
    const text = (await res.text()).slice(0, 4096);
    const body = JSON.parse(text) as { errors?: Array<{ code?: string; message?: string }> };
    const e = body.errors?.[0];
    return e ? `: ${[e.code, e.message].filter(Boolean).join(" ")}` : "";
  } catch {
    return "";
  }
}

/** `p`, or `error()` once `ms` pass first; `after` then runs (it may settle `p`: the
 * timeout has already won). */
function withIdle<T>(
  p: Promise<T>,
  ms: number,
  error: () => Error,
  after?: () => void,
): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      reject(error());
      after?.();
    }, ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

function causeOf(e: unknown): string {
  const err = e as { message?: string; cause?: { code?: string; message?: string } };
  return err.cause?.code ?? err.cause?.message ?? err.message ?? String(e);
}

const sha256 = (b: Buffer) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

/** The config's "KEY=value" list as a record (an entry without "=" names nothing). */
export function envOf(list: readonly string[] | null | undefined): Record<string, string> {
  const env: Record<string, string> = {};
  for (const kv of list ?? []) {
    const eq = kv.indexOf("=");
    if (eq > 0) env[kv.slice(0, eq)] = kv.slice(eq + 1);
  }
  return env;
}
