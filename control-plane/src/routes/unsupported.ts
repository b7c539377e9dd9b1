import { NotSupportedError } from "@offshoot/shared";
import type { Router } from "./common.ts";

// Routes of Hypeman's API that this control plane does not serve yet. Each answers 501
// not_supported (after authentication, as every route), so the official client can tell "not
// here yet" from "no such instance" (404); a path that is no route of the API stays a 404.
// Images are answered in images.ts, volumes in volumes.ts, snapshots in snapshots.ts.
const UNSUPPORTED: ReadonlyArray<readonly [method: string, path: string]> = [
  ["PATCH", "/instances/:id"],
  ["POST", "/instances/:id/volumes/:volume"],
  ["DELETE", "/instances/:id/volumes/:volume"],
  ["GET", "/instances/:id/auto-standby/status"],
  ["POST", "/instances/:id/auto-standby/hold"],
  ["POST", "/images/:name/tag"],
  ["GET", "/resources"],
  ["POST", "/resources/memory/reclaim"],
  ["GET", "/capabilities"],
  ["GET", "/devices"],
  ["POST", "/devices"],
  ["GET", "/devices/available"],
  ["GET", "/devices/:id"],
  ["DELETE", "/devices/:id"],
  ["GET", "/builds"],
  ["POST", "/builds"],
  ["GET", "/builds/:id"],
  ["DELETE", "/builds/:id"],
  ["GET", "/builds/:id/events"],
  ["GET", "/builders"],
  ["POST", "/builders"],
  ["GET", "/builders/:id"],
  ["DELETE", "/builders/:id"],
  ["POST", "/builders/:id/prune"],
  ["GET", "/ingresses"],
  ["POST", "/ingresses"],
  ["GET", "/ingresses/:id"],
  ["DELETE", "/ingresses/:id"],
  ["GET", "/pushes"],
  ["POST", "/pushes"],
  ["GET", "/pushes/:id"],
];

/** The first segment of every path above: these need an API key like every other route. */
export const UNSUPPORTED_PREFIXES = [
  ...new Set(UNSUPPORTED.map(([, path]) => `/${path.split("/")[1]}`)),
].filter((p) => p !== "/instances" && p !== "/images" && p !== "/volumes");

export function registerUnsupportedRoutes(app: Router) {
  for (const [method, path] of UNSUPPORTED) {
    app.on(method, path, () => {
      throw new NotSupportedError(
        `${method} ${path.replaceAll(/:(\w+)/g, "{$1}")} is not supported by this control plane yet`,
      );
    });
  }
}
