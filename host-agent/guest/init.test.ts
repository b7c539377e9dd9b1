// The init script as scripts/vm-assets.ts packs it: as it is, under a name that changes with it.
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import {
  ensureVmAssets,
  INIT_FILE,
  initramfsRecipe,
  type VmAssets,
} from "../../scripts/vm-assets.ts";

let assets: VmAssets;
beforeAll(async () => {
  assets = await ensureVmAssets();
}, 5 * 60_000);

describe("the guest init in the initramfs", () => {
  const cpio = (args: string) =>
    spawnSync("sh", ["-c", `gzip -dc "$1" | cpio ${args} --quiet init`, "sh", assets.initramfs], {
      maxBuffer: 1 << 20,
    });

  it("is the init file, byte for byte, and executable", () => {
    const packed = cpio("-i --to-stdout");
    expect(packed.status).toBe(0);
    expect(packed.stdout.equals(readFileSync(INIT_FILE))).toBe(true);
    expect(cpio("-t -v").stdout.toString()).toMatch(/^-rwxr-xr-x /);
  });

  it("names the initramfs after the init's text, so an edit builds a new one", () => {
    const text = readFileSync(INIT_FILE, "utf8");
    expect(path.basename(assets.initramfs)).toContain(`-${initramfsRecipe(text)}.cpio.gz`);
    expect(initramfsRecipe(`${text}# edited\n`)).not.toBe(initramfsRecipe(text));
  });
});
