import { execFileSync } from "node:child_process";
import { mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { tempDir } from "../../testing/index.ts";
import { escapes, TAR_END, type TarEntry, TarReader, tarHeader, tarPadding } from "./tar.ts";

/** Everything a reader makes of `archive`, fed `chunk` bytes at a time. */
function read(archive: Buffer, chunk: number) {
  const entries: Array<TarEntry & { data: string }> = [];
  let ended = false;
  const reader = new TarReader({
    entry: (e) => entries.push({ ...e, data: "" }),
    data: (d) => {
      const last = entries.at(-1);
      if (last) last.data += d.toString("latin1");
    },
    end: () => {
      ended = true;
    },
  });
  for (let i = 0; i < archive.length; i += chunk) reader.push(archive.subarray(i, i + chunk));
  return { entries, ended };
}

describe("tar reader", () => {
  it("reads GNU tar's archive of a tree (long names, a symlink, modes) in any chunking", async () => {
    const dir = await tempDir();
    const long = "n".repeat(150);
    mkdirSync(path.join(dir, "t", long), { recursive: true });
    writeFileSync(path.join(dir, "t", long, "f"), "x".repeat(1000), { mode: 0o640 });
    symlinkSync(`${long}/f`, path.join(dir, "t", "l"));
    const archive = execFileSync("tar", ["-c", "-C", dir, "--sort=name", "t"]);
    for (const chunk of [1, 7, 512, 100_000]) {
      const { entries, ended } = read(archive, chunk);
      expect(ended).toBe(true);
      expect(
        entries.map((e) => [e.path, e.type, e.mode, e.size, e.linkTarget, e.data.length]),
      ).toEqual([
        ["t", "dir", expect.any(Number), 0, "", 0],
        ["t/l", "symlink", 0o777, 0, `${long}/f`, 0],
        [`t/${long}`, "dir", expect.any(Number), 0, "", 0],
        [`t/${long}/f`, "file", 0o640, 1000, "", 1000],
      ]);
    }
  });

  it("writes archives GNU tar reads back, long paths included", async () => {
    const long = `d/${"p".repeat(120)}`;
    const archive = Buffer.concat([
      tarHeader({ path: "d", type: "dir", mode: 0o750, uid: 0, gid: 0, size: 0, linkTarget: "" }),
      tarHeader({
        path: long,
        type: "file",
        mode: 0o600,
        uid: 1000,
        gid: 1000,
        size: 3,
        linkTarget: "",
      }),
      Buffer.from("abc"),
      tarPadding(3),
      tarHeader({
        path: "d/l",
        type: "symlink",
        mode: 0o777,
        uid: 0,
        gid: 0,
        size: 0,
        linkTarget: "x".repeat(130),
      }),
      TAR_END,
    ]);
    const dir = await tempDir();
    writeFileSync(path.join(dir, "a.tar"), archive);
    const listing = execFileSync("tar", [
      "-tv",
      "--numeric-owner",
      "-f",
      path.join(dir, "a.tar"),
    ]).toString();
    expect(listing).toMatch(/^drwxr-x--- 0\/0 .* d\/$/m);
    expect(listing).toMatch(new RegExp(`^-rw------- 1000/1000 +3 .* ${long}$`, "m"));
    expect(listing).toMatch(new RegExp(`^lrwxrwxrwx 0/0 .* d/l -> ${"x".repeat(130)}$`, "m"));
    expect(read(archive, 300).entries.map((e) => e.path)).toEqual(["d", long, "d/l"]);
  });

  it("refuses an archive cut off inside an entry, and a header with a bad checksum", () => {
    const whole = Buffer.concat([
      tarHeader({ path: "f", type: "file", mode: 0o644, uid: 0, gid: 0, size: 10, linkTarget: "" }),
      Buffer.from("12345"),
    ]);
    const reader = new TarReader({ entry: () => {}, data: () => {}, end: () => {} });
    reader.push(whole);
    expect(() => reader.close()).toThrow(/ends inside an entry/);
    const bad = Buffer.from(whole.subarray(0, 512));
    bad[0] = 0x41;
    expect(() =>
      new TarReader({ entry: () => {}, data: () => {}, end: () => {} }).push(bad),
    ).toThrow(/checksum/);
  });
});

describe("escapes", () => {
  it("keeps paths inside the target and names why others are not", () => {
    const links = new Set(["lnk"]);
    expect(escapes("a/b/c", links)).toBeUndefined();
    expect(escapes("./a//b/", links)).toBeUndefined();
    expect(escapes("lnk", links)).toBeUndefined();
    expect(escapes("/etc/passwd", links)).toBe("an absolute path");
    expect(escapes("a/../../b", links)).toBe("a '..' component");
    expect(escapes("..", links)).toBe("a '..' component");
    expect(escapes("lnk/x", links)).toBe("a path through a symlink in the archive");
    expect(escapes("./lnk/x/y", links)).toBe("a path through a symlink in the archive");
  });
});
