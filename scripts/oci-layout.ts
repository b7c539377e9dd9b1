// OCI image layouts built from tar entries written here (so a test can make any entry a hostile
// layer could hold: "../" names, absolute paths, links out of the root), with each layer gzip'd,
// zstd'd or plain: the test image (oci-image.ts), the images tests and benchmarks push to a
// registry (host-agent/testing/registry.ts). A layout holds one image. Deterministic: no
// timestamps, gzip without a name or time.
//
//   const dir = await writeLayout(tmp, { layers: [{ entries: [file("etc/motd", "hi")] }],
//     config: { Cmd: ["/bin/sh"] } });
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { gzipSync } from "node:zlib";

export interface TarEntry {
  name: string;
  type: "file" | "dir" | "symlink" | "hardlink";
  /** File contents; the target of a link. */
  data?: Buffer | string;
  target?: string;
  mode?: number;
  uid?: number;
  gid?: number;
}

export const file = (name: string, data: Buffer | string, mode = 0o644): TarEntry => ({
  name,
  type: "file",
  data,
  mode,
});
export const dir = (name: string, mode = 0o755): TarEntry => ({ name, type: "dir", mode });
export const symlink = (name: string, target: string): TarEntry => ({
  name,
  type: "symlink",
  target,
});
export const hardlink = (name: string, target: string): TarEntry => ({
  name,
  type: "hardlink",
  target,
});

function octal(n: number, width: number): string {
  return `${n.toString(8).padStart(width - 1, "0")}\0`;
}

/** A ustar archive of `entries`, in order (names up to 100 bytes, or split at a slash). */
export function tar(entries: TarEntry[]): Buffer {
  const blocks: Buffer[] = [];
  for (const e of entries) {
    const data = e.type === "file" ? Buffer.from(e.data ?? "") : Buffer.alloc(0);
    blocks.push(tarHeader(e, data.length), data, Buffer.alloc((512 - (data.length % 512)) % 512));
  }
  blocks.push(Buffer.alloc(1024));
  return Buffer.concat(blocks);
}

/** The 512-byte ustar header of `e` for a body of `size` bytes (which the caller writes). */
export function tarHeader(e: TarEntry, size: number): Buffer {
  const h = Buffer.alloc(512);
  let name = e.name;
  let prefix = "";
  if (Buffer.byteLength(name) > 100) {
    const cut = name.lastIndexOf("/");
    prefix = name.slice(0, cut);
    name = name.slice(cut + 1);
  }
  h.write(name, 0, 100);
  h.write(octal(e.mode ?? (e.type === "dir" ? 0o755 : 0o644), 8), 100);
  h.write(octal(e.uid ?? 0, 8), 108);
  h.write(octal(e.gid ?? 0, 8), 116);
  h.write(octal(size, 12), 124);
  h.write(octal(0, 12), 136);
  h.write("        ", 148);
  h.write({ file: "0", dir: "5", symlink: "2", hardlink: "1" }[e.type], 156);
  if (e.target) h.write(e.target, 157, 100);
  h.write("ustar\0", 257);
  h.write("00", 263);
  h.write(prefix, 345, 155);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(`${sum.toString(8).padStart(6, "0")}\0 `, 148);
  return h;
}

/** Debian's static busybox as /bin/busybox with a symlink per applet. */
export function busyboxBin(): TarEntry[] {
  const applets = execFileSync("/bin/busybox", ["--list"]).toString().split("\n").filter(Boolean);
  return [
    dir("bin"),
    file("bin/busybox", readFileSync("/bin/busybox"), 0o755),
    ...applets.filter((a) => a !== "busybox").map((a) => symlink(`bin/${a}`, "busybox")),
  ];
}

/** A base layer for test images: busybox, root and an `app` user (1000:1000). */
export function busyboxEntries(): TarEntry[] {
  return [
    ...busyboxBin(),
    dir("etc"),
    file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"),
    file("etc/group", "root:x:0:\napp:x:1000:\n"),
  ];
}

export interface LayerSpec {
  entries: TarEntry[];
  /** A tar made elsewhere, used instead of `entries`. */
  tar?: Buffer;
  compression?: "gzip" | "zstd" | "tar";
}

export interface ImageConfig {
  Entrypoint?: string[];
  Cmd?: string[];
  Env?: string[];
  WorkingDir?: string;
  User?: string;
}

const MEDIA = {
  gzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  zstd: "application/vnd.oci.image.layer.v1.tar+zstd",
  tar: "application/vnd.oci.image.layer.v1.tar",
} as const;

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** Writes a layout at `out` holding one linux/amd64 image; returns its manifest's digest and
 * each layer's descriptor. `layers` may also be raw compressed bytes (a corrupt stream). */
export function writeLayout(
  out: string,
  image: {
    layers: LayerSpec[];
    config?: ImageConfig;
    architecture?: string;
    /** The org.opencontainers.image.ref.name annotation of the index's entry. */
    refName?: string;
  },
): { digest: string; layers: Array<{ digest: string; size: number }> } {
  mkdirSync(path.join(out, "blobs", "sha256"), { recursive: true });
  const blob = (mediaType: string, bytes: Buffer) => {
    const hex = sha256(bytes);
    writeFileSync(path.join(out, "blobs", "sha256", hex), bytes);
    return { mediaType, digest: `sha256:${hex}`, size: bytes.length };
  };
  const layers = image.layers.map((l) => {
    const raw = l.tar ?? tar(l.entries);
    const c = l.compression ?? "gzip";
    const bytes =
      c === "gzip"
        ? gzipSync(raw)
        : c === "zstd"
          ? execFileSync("zstd", ["-q", "-c", "-3"], { input: raw })
          : raw;
    return { ...blob(MEDIA[c], bytes), diffId: `sha256:${sha256(raw)}` };
  });
  const config = blob(
    "application/vnd.oci.image.config.v1+json",
    Buffer.from(
      JSON.stringify({
        architecture: image.architecture ?? "amd64",
        os: "linux",
        config: image.config ?? {},
        rootfs: { type: "layers", diff_ids: layers.map((l) => l.diffId) },
      }),
    ),
  );
  const manifest = blob(
    "application/vnd.oci.image.manifest.v1+json",
    Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        config,
        layers: layers.map(({ mediaType, digest, size }) => ({ mediaType, digest, size })),
      }),
    ),
  );
  writeFileSync(path.join(out, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  writeFileSync(
    path.join(out, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        {
          ...manifest,
          platform: { os: "linux", architecture: image.architecture ?? "amd64" },
          ...(image.refName
            ? { annotations: { "org.opencontainers.image.ref.name": image.refName } }
            : {}),
        },
      ],
    }),
  );
  return { digest: manifest.digest, layers: layers.map(({ digest, size }) => ({ digest, size })) };
}
