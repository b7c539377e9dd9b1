// Reads a built image rootfs without mounting it: ext4 through debugfs, erofs extracted once
// with fsck.erofs (erofs-utils) into a directory beside it.
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { execa } from "execa";

export interface RootfsReader {
  /** Names in a directory, sorted. */
  ls(dir: string): Promise<string[]>;
  cat(file: string): Promise<string>;
}

export function readRootfs(file: string): RootfsReader {
  if (file.endsWith(".erofs")) {
    const dir = `${file}.extracted`;
    const extracted = async () => {
      if (!existsSync(dir)) await execa("fsck.erofs", [`--extract=${dir}`, file]);
      return dir;
    };
    return {
      ls: async (d) => readdirSync(`${await extracted()}/${d}`).sort(),
      cat: async (f) => readFileSync(`${await extracted()}/${f}`, "utf8"),
    };
  }
  const debugfs = async (cmd: string) => (await execa("debugfs", ["-R", cmd, file])).stdout;
  return {
    ls: async (d) =>
      (await debugfs(`ls -p ${d}`))
        .split("\n")
        .map((l) => l.split("/")[5])
        .filter((x): x is string => !!x && x !== "." && x !== "..")
        .sort(),
    cat: (f) => debugfs(`cat ${f}`),
  };
}
