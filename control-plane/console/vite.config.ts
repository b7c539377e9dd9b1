// The web console's build: a single-page app served at /console/ by the control plane (Node:
// server.ts; Workers: the assets binding in wrangler.toml). `npm run console:build` writes it
// to control-plane/console/dist/console/ (not committed).
import { fileURLToPath } from "node:url";
import { defineConfig } from "vite";

// biome-ignore lint/style/noDefaultExport: Vite reads its configuration as the default export
export default defineConfig({
  root: fileURLToPath(new URL(".", import.meta.url)),
  base: "/console/",
  logLevel: "warn",
  oxc: { jsx: { runtime: "automatic", importSource: "preact" } },
  build: {
    outDir: "dist/console",
    emptyOutDir: true,
    chunkSizeWarningLimit: 1024,
  },
});
