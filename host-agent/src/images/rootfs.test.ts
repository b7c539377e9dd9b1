// Layers applied into a rootfs: whiteouts, opaque dirs, and layers that try to write outside the
// image through symlinks and hard links (the agent runs as root: such a layer must shape only its
// own rootfs). Layers are written here as plain ustar archives, entry by entry.
import { existsSync, lstatSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { execa } from "execa";
import { afterAll, describe, expect, it } from "vitest";
import { buildRootfs } from "./rootfs.ts";

type Entry =
  | { name: string; type: "file"; data?: string }
  | { name: string; type: "dir" }
  | { name: string; type: "symlink" | "hardlink"; target: string };

function header(e: Entry, size: number): Buffer {
  const h = Buffer.alloc(512);
  const put = (s: string, at: number, len: number) => h.write(s, at, len, "utf8");
  const oct = (n: number, at: number, len: number) =>
    put(`${n.toString(8).padStart(len - 1, "0")}\0`, at, len);
  put(e.name, 0, 100);
  oct(e.type === "dir" ? 0o755 : 0o644, 100, 8);
  oct(0, 108, 8);
  oct(0, 116, 8);
  oct(size, 124, 12);
  oct(0, 136, 12);
  put("        ", 148, 8);
  put({ file: "0", dir: "5", symlink: "2", hardlink: "1" }[e.type], 156, 1);
  if (e.type === "symlink" || e.type === "hardlink") put(e.target, 157, 100);
  put("ustar\0", 257, 6);
  put("00", 263, 2);
  let sum = 0;
  for (const b of h) sum += b;
  put(`${sum.toString(8).padStart(6, "0")}\0 `, 148, 8);
  return h;
}

function tar(entries: Entry[]): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    const data = Buffer.from(e.type === "file" ? (e.data ?? "") : "");
    parts.push(header(e, data.length), data, Buffer.alloc((512 - (data.length % 512)) % 512));
  }
  parts.push(Buffer.alloc(1024));
  return Buffer.concat(parts);
}

const root = mkdtempSync(path.join(os.tmpdir(), "rootfs-test-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** Builds a rootfs from the layers and returns a function listing/reading it (debugfs). */
async function build(name: string, layers: Entry[][]) {
  const files = layers.map((l, i) => {
    const f = path.join(root, `${name}-${i}.tar`);
    writeFileSync(f, tar(l));
    return { file: f, compression: "tar" as const };
  });
  const out = path.join(root, `${name}.ext4`);
  await buildRootfs(files, path.join(root, `${name}.stage`), out);
  const debugfs = async (cmd: string) =>
    (await execa("debugfs", ["-R", cmd, out], { reject: false })).stdout;
  return {
    ls: async (dir: string) =>
      (await debugfs(`ls -p ${dir}`))
        .split("\n")
        .map((l) => l.split("/")[5])
        .filter((n): n is string => !!n && n !== "." && n !== ".."),
    cat: (file: string) => debugfs(`cat ${file}`),
  };
}

describe("buildRootfs", () => {
  it("applies whiteouts and opaque dirs, by their real names", async () => {
    const fs = await build("wh", [
      [
        { name: "etc/", type: "dir" },
        { name: "etc/motd", type: "file", data: "lower" },
        { name: "etc/café", type: "file", data: "lower" },
        { name: "opt/", type: "dir" },
        { name: "opt/old", type: "file", data: "lower" },
      ],
      [
        { name: "etc/.wh.motd", type: "file" },
        { name: "etc/.wh.café", type: "file" },
        { name: "opt/.wh..wh..opq", type: "file" },
        { name: "opt/new", type: "file", data: "upper" },
        { name: "fresh/", type: "dir" },
        { name: "fresh/.wh.nothing", type: "file" },
        { name: "fresh/kept", type: "file", data: "x" },
      ],
    ]);
    expect(await fs.ls("/etc")).toEqual([]);
    expect(await fs.ls("/opt")).toEqual(["new"]);
    expect(await fs.ls("/fresh")).toEqual(["kept"]);
    expect(await fs.cat("/opt/new")).toBe("upper");
  });

  it("keeps writes through symlinks and hard links inside the image", async () => {
    const outside = path.join(root, "outside");
    writeFileSync(outside, "original");
    const fs = await build("escape", [
      [
        { name: "b", type: "symlink", target: root },
        { name: "h", type: "symlink", target: root },
      ],
      [
        // A relative symlink made in this layer, then a file written through it.
        { name: "a", type: "symlink", target: "b" },
        { name: "a/outside", type: "file", data: "pwned" },
        // A hard link to a host file through an earlier layer's symlink.
        { name: "x", type: "hardlink", target: "h/outside" },
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
