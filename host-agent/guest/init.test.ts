// The init script and offshoot-ctl as scripts/vm-assets.ts packs them: the init as it is, ctl.c
// compiled static, under a name that changes with either.
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import {
  AGENT_BINARY,
  AGENT_SOURCE,
  CTL_BINARY,
  CTL_SOURCE,
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
  const cpio = (args: string, file = "init") =>
    spawnSync(
      "sh",
      ["-c", `gzip -dc "$1" | cpio ${args} --quiet "$2"`, "sh", assets.initramfs, file],
      { maxBuffer: 16 << 20 },
    );

  it("is the init file, byte for byte, and executable", () => {
    const packed = cpio("-i --to-stdout");
    expect(packed.status).toBe(0);
    expect(packed.stdout.equals(readFileSync(INIT_FILE))).toBe(true);
    expect(cpio("-t -v").stdout.toString()).toMatch(/^-rwxr-xr-x /);
  });

  it.each([CTL_BINARY, AGENT_BINARY])("holds %s, executable and static", (binary) => {
    const listed = cpio("-t -v", binary).stdout.toString();
    expect(listed).toMatch(/^-rwxr-xr-x /);
    const elf = cpio("-i --to-stdout", binary).stdout;
    expect(elf.subarray(0, 4).toString("latin1")).toBe("\x7fELF");
    // No PT_INTERP program header: it runs without a dynamic loader.
    const phoff = Number(elf.readBigUInt64LE(32));
    const [size, count] = [elf.readUInt16LE(54), elf.readUInt16LE(56)];
    for (let i = 0; i < count; i++) expect(elf.readUInt32LE(phoff + i * size)).not.toBe(3);
  });

  it("names the initramfs after the init's text and the C sources, so an edit of any builds anew", () => {
    const text = readFileSync(INIT_FILE, "utf8");
    const sources = {
      ctl: readFileSync(CTL_SOURCE, "utf8"),
      agent: readFileSync(AGENT_SOURCE, "utf8"),
    };
    const recipe = initramfsRecipe(text, sources);
    expect(path.basename(assets.initramfs)).toContain(`-${recipe}.cpio.gz`);
    expect(initramfsRecipe(`${text}# edited\n`, sources)).not.toBe(recipe);
    expect(initramfsRecipe(text, { ...sources, ctl: `${sources.ctl}/* edited */\n` })).not.toBe(
      recipe,
    );
    expect(initramfsRecipe(text, { ...sources, agent: `${sources.agent}/* edited */\n` })).not.toBe(
      recipe,
    );
  });
});
