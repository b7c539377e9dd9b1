// A small OCI image for tests, benchmarks and `npm start`: Debian's static busybox and a program
// that counts on the console (`OFFSHOOT-COUNT n` every second, what fork tests watch), as an OCI
// image layout of two layers (the second whites out a file of the first, so importing exercises
// whiteouts). Written by oci-layout.ts into the VM assets cache, never into git; deterministic
// for one busybox binary.
//
//   import { ensureTestImage, TEST_IMAGE } from "./scripts/oci-image.ts";
//   const layoutDir = ensureTestImage();
//
// As a CLI, `node --import tsx scripts/oci-image.ts` prints the layout's path.
import { createHash } from "node:crypto";
import { existsSync, renameSync, rmSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { busyboxBin, dir, file, writeLayout } from "./oci-layout.ts";
import { defaultAssetsDir } from "./vm-assets.ts";

export const TEST_IMAGE = "localhost/offshoot/busybox:latest";

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
  .update(JSON.stringify({ v: 4, COUNT }))
  .digest("hex")
  .slice(0, 12);

export function ensureTestImage(cache: string = defaultAssetsDir()): string {
  const out = path.join(cache, "oci", `offshoot-busybox-${RECIPE}`);
  if (existsSync(path.join(out, "index.json"))) return out;
  const work = `${out}.build-${process.pid}`;
  rmSync(work, { recursive: true, force: true });
  writeLayout(work, {
    refName: TEST_IMAGE,
    layers: [
      {
        entries: [
          ...busyboxBin(),
          dir("etc"),
          file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
          file("etc/group", "root:x:0:\n"),
          file("etc/motd", "hidden by the second layer\n"),
          dir("root", 0o700),
          dir("tmp", 0o1777),
          dir("usr"),
          dir("usr/bin"),
        ],
      },
      {
        entries: [
          dir("usr"),
          dir("usr/bin"),
          file("usr/bin/count", COUNT, 0o755),
          dir("etc"),
          file("etc/.wh.motd", ""),
          file("etc/image-release", "offshoot busybox test image\n"),
          // Empty, as in images made for systemd: each guest's init writes its own machine id.
          file("etc/machine-id", ""),
        ],
      },
    ],
    config: {
      Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
      Cmd: ["/usr/bin/count"],
      WorkingDir: "/root",
    },
  });
  rmSync(out, { recursive: true, force: true });
  renameSync(work, out);
  return out;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.stdout.write(`${ensureTestImage()}\n`);
}
