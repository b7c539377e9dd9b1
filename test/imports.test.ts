// Production code never imports test code: tests may import anything, but nothing that ships may
// load a test framework, a file under a testing/ or test/ folder, or a *.test.ts file.
import { readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";
import { describe, expect, it } from "vitest";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const PRODUCTION = ["shared/src", "control-plane/src", "host-agent/src", "host-agent/guest"];
const TEST_PACKAGES = ["vitest", "@vitest", "fast-check"];
const TEST_FILE = /\.test\.[cm]?[jt]sx?$/;

/** Whether `specifier`, imported by the file `from` (relative to the repo root), is test code. */
function isTestCode(specifier: string, from: string): boolean {
  if (!specifier.startsWith(".")) {
    return TEST_PACKAGES.some((p) => specifier === p || specifier.startsWith(`${p}/`));
  }
  const target = path.posix.join(path.posix.dirname(from), specifier);
  const dirs = path.posix.dirname(target).split("/");
  return dirs.includes("testing") || dirs.includes("test") || TEST_FILE.test(target);
}

function productionFiles(dir: string): string[] {
  return readdirSync(path.join(ROOT, dir), { recursive: true, encoding: "utf8" })
    .map((f) => path.posix.join(dir, f.split(path.sep).join("/")))
    .filter((f) => f.endsWith(".ts") && !TEST_FILE.test(f) && !f.includes("node_modules/"));
}

/** Every module specifier a file imports, re-exports, or loads with import(). */
function specifiers(file: string): string[] {
  const text = readFileSync(path.join(ROOT, file), "utf8");
  return ts.preProcessFile(text, true, true).importedFiles.map((f) => f.fileName);
}

describe("production code", () => {
  it("imports no test code", () => {
    const scanned = PRODUCTION.map((dir) => ({ dir, files: productionFiles(dir) }));
    for (const { dir, files } of scanned) expect(files.length, dir).toBeGreaterThan(0);
    const found = scanned
      .flatMap(({ files }) => files)
      .flatMap((file) =>
        specifiers(file)
          .filter((s) => isTestCode(s, file))
          .map((s) => `${file} imports ${s}`),
      );
    expect(found).toEqual([]);
  });

  it("imports no script but the driver patch's check", () => {
    // scripts/ holds development and CI tools; the control plane checks at start that the
    // Postgres driver is patched, with the patch's own code.
    const allowed = new Set(["scripts/patch-postgres.ts"]);
    const found = PRODUCTION.flatMap((dir) => productionFiles(dir)).flatMap((file) =>
      specifiers(file)
        .filter((s) => s.startsWith("."))
        .map((s) => path.posix.join(path.posix.dirname(file), s))
        .filter((target) => target.startsWith("scripts/") && !allowed.has(target))
        .map((target) => `${file} imports ${target}`),
    );
    expect(found).toEqual([]);
  });

  it("is told from test code by what an import names", () => {
    const from = "host-agent/src/drivers/qemu/launch.ts";
    for (const s of [
      "vitest",
      "vitest/config",
      "@vitest/expect",
      "fast-check",
      "../../../testing/index.ts",
      "../../../testing/qemu.ts",
      "../../../../test/harness.ts",
      "./launch.test.ts",
      "../../agent.test.ts",
    ])
      expect(isTestCode(s, from), s).toBe(true);
    for (const s of [
      "node:fs",
      "@offshoot/shared",
      "./qmp.ts",
      "./testing-ground.ts",
      "../../../guest/protocol.ts",
      "../../../../scripts/patch-postgres.ts",
      "vitesse",
    ])
      expect(isTestCode(s, from), s).toBe(false);
  });

  it("names its imports, re-exports and dynamic imports", () => {
    const text = [
      'import { a } from "./a.ts";',
      'import type { B } from "./b.ts";',
      'export { c } from "./c.ts";',
      'const d = await import("./d.ts");',
      '// import { e } from "./e.ts";',
    ].join("\n");
    const names = ts.preProcessFile(text, true, true).importedFiles.map((f) => f.fileName);
    expect(names).toEqual(["./a.ts", "./b.ts", "./c.ts", "./d.ts"]);
  });
});
