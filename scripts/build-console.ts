// `npm run console:build`: builds the web console (control-plane/console/) into
// control-plane/console/dist/console/, which the Node server serves at /console/ and wrangler
// uploads as the Worker's static assets. npm start, the tests and wrangler's [build] call it;
// it rebuilds only when a source is newer than the last build (--force: always).
import { existsSync, readdirSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { CONSOLE_ASSET_CACHE, CONSOLE_HEADERS } from "../control-plane/src/console.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const CONSOLE = path.join(ROOT, "control-plane", "console");
/** The assets directory (wrangler.toml [assets]); the console itself is under console/. */
export const CONSOLE_ASSETS = path.join(CONSOLE, "dist");
const CONSOLE_DIST = path.join(CONSOLE_ASSETS, "console");
const STAMP = path.join(CONSOLE_ASSETS, ".built");

/** The console's response headers on Workers: the ones the Node server sets (_headers). */
const HEADERS = [
  "/console/*",
  ...Object.entries(CONSOLE_HEADERS).map(([k, v]) => `  ${k}: ${v}`),
  "  cache-control: no-cache",
  "/console/assets/*",
  "  ! cache-control",
  `  cache-control: ${CONSOLE_ASSET_CACHE}`,
  "",
].join("\n");

function newest(p: string): number {
  const st = statSync(p);
  if (!st.isDirectory()) return st.mtimeMs;
  let t = st.mtimeMs;
  for (const e of readdirSync(p)) {
    if (e === "dist" || e === "node_modules") continue;
    t = Math.max(t, newest(path.join(p, e)));
  }
  return t;
}

const sources = () =>
  Math.max(
    newest(CONSOLE),
    newest(path.join(ROOT, "shared", "src")),
    newest(path.join(ROOT, "package-lock.json")),
  );

export function consoleIsFresh(): boolean {
  return existsSync(STAMP) && statSync(STAMP).mtimeMs >= sources();
}

export async function buildConsole(opts: { force?: boolean } = {}): Promise<"built" | "fresh"> {
  if (!opts.force && consoleIsFresh()) return "fresh";
  const { build } = await import("vite");
  await build({ configFile: path.join(CONSOLE, "vite.config.ts"), logLevel: "warn" });
  writeFileSync(path.join(CONSOLE_ASSETS, "_headers"), HEADERS);
  writeFileSync(path.join(CONSOLE_ASSETS, ".assetsignore"), ".built\n");
  writeFileSync(STAMP, `${new Date().toISOString()}\n`);
  return "built";
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const t0 = Date.now();
  const how = await buildConsole({ force: process.argv.includes("--force") });
  console.log(
    how === "built"
      ? `console built into ${path.relative(ROOT, CONSOLE_DIST)} in ${Date.now() - t0} ms`
      : "console is up to date",
  );
}
