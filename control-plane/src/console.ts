// The web console's files (built by scripts/build-console.ts) at /console/ on Node; on Workers
// the assets binding serves the same files with the same headers (written to _headers).
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { serveStatic } from "@hono/node-server/serve-static";
import type { Router } from "./routes/common.ts";

export const CONSOLE_DIST = path.resolve(
  path.dirname(fileURLToPath(import.meta.url)),
  "..",
  "console",
  "dist",
  "console",
);

/** Every console response's headers: the page loads only its own files and talks only to its
 * own origin (the API, its event stream and its WebSockets). */
export const CONSOLE_HEADERS: Record<string, string> = {
  "content-security-policy":
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
};
/** Built files are named by their content's hash: cached for good. */
export const CONSOLE_ASSET_CACHE = "public, max-age=31536000, immutable";

export function mountConsole(app: Router, dist = CONSOLE_DIST) {
  const files = serveStatic({
    root: dist,
    rewriteRequestPath: (p) => p.replace(/^\/console/, ""),
    onFound: (p, c) => {
      c.header(
        "cache-control",
        p.includes(`${path.sep}assets${path.sep}`) ? CONSOLE_ASSET_CACHE : "no-cache",
      );
    },
  });
  app.get("/console/*", async (c, next) => {
    for (const [k, v] of Object.entries(CONSOLE_HEADERS)) c.header(k, v);
    if (!existsSync(path.join(dist, "index.html"))) {
      return c.json(
        { code: "unavailable", message: "the console is not built: run npm run console:build" },
        503,
      );
    }
    return files(c, next);
  });
}
