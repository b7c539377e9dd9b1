// Image references and what a host reports about the images it holds. Names are normalized as
// Docker does ("alpine" → "docker.io/library/alpine:latest"), so a create that says "alpine"
// finds the image imported as "docker.io/library/alpine:latest", and the reverse.
import { z } from "zod";

/** An image a host has imported and converted: its rootfs is ready to boot. */
export const ImageInfo = z.object({
  /** Normalized reference. */
  name: z.string(),
  /** The manifest's digest ("sha256:…"). */
  digest: z.string(),
  platform: z.string(),
  /** Size of the bootable rootfs built from the layers. */
  size_bytes: z.number().int().nonnegative(),
  entrypoint: z.array(z.string()).nullable(),
  cmd: z.array(z.string()).nullable(),
  env: z.record(z.string(), z.string()),
  working_dir: z.string().nullable(),
  created_at: z.string(),
});
export type ImageInfo = z.infer<typeof ImageInfo>;

/** A sha256 content digest, as manifests and blobs are named. */
export const DIGEST = /^sha256:[a-f0-9]{64}$/;
// Lowercase path components separated by / ; an optional :tag and/or @digest at the end.
const REFERENCE =
  /^(?<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:\/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)(?::(?<tag>[\w][\w.-]{0,127}))?(?:@(?<digest>sha256:[a-f0-9]{64}))?$/;

/** "alpine" → "docker.io/library/alpine:latest"; undefined when it is not a reference. A first
 * component counts as a registry only if it has a dot or a port or is "localhost". */
export function normalizeImageRef(ref: string): string | undefined {
  if (ref.length === 0 || ref.length > 255) return undefined;
  let domain: string | undefined;
  let rest = ref;
  const slash = ref.indexOf("/");
  if (slash > 0) {
    const first = ref.slice(0, slash);
    if (first.includes(".") || first.includes(":") || first === "localhost") {
      if (!/^[a-zA-Z0-9.-]+(?::[0-9]+)?$/.test(first)) return undefined;
      domain = first;
      rest = ref.slice(slash + 1);
    }
  }
  const m = REFERENCE.exec(rest);
  if (!m?.groups?.path) return undefined;
  const { path, tag, digest } = m.groups;
  if (digest !== undefined && !DIGEST.test(digest)) return undefined;
  const host = (domain ?? "docker.io").toLowerCase();
  const repo = host === "docker.io" && !path.includes("/") ? `library/${path}` : path;
  if (digest !== undefined) return `${host}/${repo}${tag ? `:${tag}` : ""}@${digest}`;
  return `${host}/${repo}:${tag ?? "latest"}`;
}
