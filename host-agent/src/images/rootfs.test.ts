// Layers applied into a rootfs: whiteouts, opaque dirs, and layers that try to write outside the
// image through symlinks and hard links (the agent runs as root: such a layer must shape only its
// own rootfs). Layers are written here as plain ustar archives, entry by entry.
import { existsSync, lstatSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { dir, file, hardlink, symlink, type TarEntry, tar } from "../../../scripts/oci-layout.ts";
import { readRootfs } from "../../testing/rootfs.ts";
import { buildRootfs, type RootfsFormat } from "./rootfs.ts";

/** A lower layer, and an upper one whiting out two of its files (one with a non-ASCII name),
 * making a directory opaque, and bringing a new directory whose whiteout hides nothing. */
const whiteoutLayers = (): TarEntry[][] => [
  [
    dir("etc/"),
    file("etc/motd", "lower"),
    file("etc/café", "lower"),
    dir("opt/"),
    file("opt/old", "lower"),
  ],
  [
    file("etc/.wh.motd", ""),
    file("etc/.wh.café", ""),
    file("opt/.wh..wh..opq", ""),
    file("opt/new", "upper"),
    dir("fresh/"),
    file("fresh/.wh.nothing", ""),
    file("fresh/kept", "x"),
  ],
];

const root = mkdtempSync(path.join(os.tmpdir(), "rootfs-test-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** Builds a rootfs from the layers and returns functions listing and reading it. */
async function build(name: string, layers: TarEntry[][], format: RootfsFormat = "ext4") {
  const files = layers.map((l, i) => {
    const f = path.join(root, `${name}-${i}.tar`);
    writeFileSync(f, tar(l));
    return { file: f, compression: "tar" as const };
  });
  const out = path.join(root, `${name}.${format}`);
  await buildRootfs(files, path.join(root, `${name}.stage`), out, format);
  return readRootfs(out);
}

describe("buildRootfs", () => {
  for (const format of ["ext4", "erofs"] as const) {
    it(`applies whiteouts and opaque dirs, by their real names (${format})`, async () => {
      const fs = await build(`wh-${format}`, whiteoutLayers(), format);
      expect(await fs.ls("/etc")).toEqual([]);
      expect(await fs.ls("/opt")).toEqual(["new"]);
      expect(await fs.ls("/fresh")).toEqual(["kept"]);
      expect(await fs.cat("/opt/new")).toBe("upper");
    });
  }

  it("keeps writes through symlinks and hard links inside the image", async () => {
    const outside = path.join(root, "outside");
    writeFileSync(outside, "original");
    const fs = await build("escape", [
      [symlink("b", root), symlink("h", root)],
      [
        // A relative symlink made in this layer, then a file written through it.
        symlink("a", "b"),
        file("a/outside", "pwned"),
        // A hard link to a host file through an earlier layer's symlink.
        hardlink("x", "h/outside"),
      ],
    ]).catch((e: unknown) => e);
    // Refused or confined: either way the host file is untouched and not in the image.
    expect(readFileSync(outside, "utf8")).toBe("original");
    expect(lstatSync(outside).nlink).toBe(1);
    if (!(fs instanceof Error)) {
      expect(await (fs as Awaited<ReturnType<typeof build>>).cat("/x")).not.toBe("original");
    }
    expect(existsSync(path.join(root, "escape.stage"))).toBe(false);
  });
});
