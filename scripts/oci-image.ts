// A small OCI image for tests, benchmarks and `npm start`: Debian's static busybox and a program
// that counts on the console (`OFFSHOOT-COUNT n` every second, what fork tests watch), as an OCI
// image layout of two layers (the second whites out a file of the first, so importing exercises
// whiteouts). Built with tar and gzip into the VM assets cache, never into git; deterministic for
// one busybox binary.
//
//   import { ensureTestImage, TEST_IMAGE } from "./scripts/oci-image.ts";
//   const layoutDir = ensureTestImage();
//
// As a CLI, `node --import tsx scripts/oci-image.ts` prints the layout's path.
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import {
  chmodSync,
  existsSync,
  mkdirSync,
  readFileSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { gunzipSync } from "node:zlib";
import { defaultAssetsDir } from "./vm-assets.ts";

export const TEST_IMAGE = "localhost/offshoot/busybox:latest";

const BUSYBOX = "/bin/busybox";
const COUNT = `#!/bin/sh
# Prints a line a second; a fork's log continues the count its memory was snapshotted with.
n=\${COUNT_FROM:-0}
while :; do
  echo "OFFSHOOT-COUNT $n"
  n=$((n + 1))
  sleep 1
done
`;
const RECIPE = createHash("sha256")
  .update(JSON.stringify({ v: 2, COUNT }))
  .digest("hex")
  .slice(0, 12);

function sh(script: string, ...args: string[]): Buffer {
  const r = spawnSync("sh", ["-c", script, "sh", ...args], { maxBuffer: 1 << 28 });
  if (r.status !== 0) throw new Error(`${script}: ${r.stderr.toString()}`);
  return r.stdout;
}

const sha256 = (b: Buffer | string) => createHash("sha256").update(b).digest("hex");

/** Writes a blob, returns its descriptor. */
function blob(dir: string, mediaType: string, bytes: Buffer) {
  const hex = sha256(bytes);
  writeFileSync(path.join(dir, "blobs", "sha256", hex), bytes);
  return { mediaType, digest: `sha256:${hex}`, size: bytes.length };
}

/** A reproducible gzip'd tar of a staged tree. */
function layer(stage: string): Buffer {
  return sh(
    'cd "$1" && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - . | gzip -n -6',
    stage,
  );
}

export function ensureTestImage(cache: string = defaultAssetsDir()): string {
  const out = path.join(cache, "oci", `offshoot-busybox-${RECIPE}`);
  if (existsSync(path.join(out, "index.json"))) return out;
  const work = `${out}.build-${process.pid}`;
  rmSync(work, { recursive: true, force: true });
  mkdirSync(path.join(work, "blobs", "sha256"), { recursive: true });
  const l1 = path.join(work, "l1");
  const l2 = path.join(work, "l2");
  for (const d of ["bin", "etc", "root", "tmp", "usr/bin"])
    mkdirSync(path.join(l1, d), { recursive: true });
  writeFileSync(path.join(l1, "bin", "busybox"), readFileSync(BUSYBOX));
  chmodSync(path.join(l1, "bin", "busybox"), 0o755);
  const applets = sh(`${BUSYBOX} --list`).toString().split("\n").filter(Boolean);
  for (const a of applets) if (a !== "busybox") symlinkSync("busybox", path.join(l1, "bin", a));
  writeFileSync(path.join(l1, "etc", "passwd"), "root:x:0:0:root:/root:/bin/sh\n");
  writeFileSync(path.join(l1, "etc", "group"), "root:x:0:\n");
  writeFileSync(path.join(l1, "etc", "motd"), "hidden by the second layer\n");
  mkdirSync(path.join(l2, "usr", "bin"), { recursive: true });
  mkdirSync(path.join(l2, "etc"), { recursive: true });
  writeFileSync(path.join(l2, "usr", "bin", "count"), COUNT, { mode: 0o755 });
  writeFileSync(path.join(l2, "etc", ".wh.motd"), "");
  writeFileSync(path.join(l2, "etc", "image-release"), "offshoot busybox test image\n");
  // Empty, as in images made for systemd: each guest's init writes the guest's own machine id.
  writeFileSync(path.join(l2, "etc", "machine-id"), "");
  const layers = [l1, l2].map((d) => {
    const bytes = layer(d);
    const diffId = `sha256:${sha256(gunzipSync(bytes))}`;
    return { ...blob(work, "application/vnd.oci.image.layer.v1.tar+gzip", bytes), diffId };
  });
  const config = blob(
    work,
    "application/vnd.oci.image.config.v1+json",
    Buffer.from(
      JSON.stringify({
        architecture: "amd64",
        os: "linux",
        config: {
          Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
          Cmd: ["/usr/bin/count"],
          WorkingDir: "/root",
        },
        rootfs: { type: "layers", diff_ids: layers.map((l) => l.diffId) },
      }),
    ),
  );
  const manifest = blob(
    work,
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
  writeFileSync(path.join(work, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  writeFileSync(
    path.join(work, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [
        {
          ...manifest,
          platform: { os: "linux", architecture: "amd64" },
          annotations: { "org.opencontainers.image.ref.name": TEST_IMAGE },
        },
      ],
    }),
  );
  rmSync(l1, { recursive: true, force: true });
  rmSync(l2, { recursive: true, force: true });
  rmSync(out, { recursive: true, force: true });
  renameSync(work, out);
  return out;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.stdout.write(`${ensureTestImage()}\n`);
}
