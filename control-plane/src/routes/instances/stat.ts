import { createRoute, z } from "@hono/zod-openapi";
import { InstanceStats, PathInfo } from "@offshoot/shared";
import { instanceStats, statPath } from "../../services/instances/guest.ts";
import { errorsFor, IdParam, json, type Router, security } from "../common.ts";

const statRoute = createRoute({
  method: "get",
  path: "/instances/{id}/stat",
  summary: "Get filesystem path info",
  description:
    "A path in the guest's filesystem, as its guest agent sees it. 409 unless the instance is Running with a guest agent.",
  security,
  request: {
    params: IdParam,
    query: z.object({
      path: z
        .string()
        .min(1)
        .max(4096)
        .openapi({ param: { name: "path", in: "query" }, example: "/app/data" }),
      follow_links: z
        .enum(["true", "false"])
        .default("false")
        .openapi({
          param: { name: "follow_links", in: "query" },
          description: "Follow symbolic links (stat rather than lstat)",
        }),
    }),
  },
  responses: {
    200: { description: "Path information", content: json(PathInfo) },
    ...errorsFor(400, 401, 404, 409, 503, 504),
  },
});

const statsRoute = createRoute({
  method: "get",
  path: "/instances/{id}/stats",
  summary: "Get instance resource utilization stats",
  description:
    "CPU time and memory of the instance's VMM process (from /proc/<pid>/stat and statm) and its TAP's byte counters. 409 unless the instance is Running.",
  security,
  request: { params: IdParam },
  responses: {
    200: { description: "Instance utilization statistics", content: json(InstanceStats) },
    ...errorsFor(401, 404, 409, 503, 504),
  },
});

export function registerInstanceStat(app: Router) {
  app.openapi(statRoute, async (c) => {
    const q = c.req.valid("query");
    return c.json(
      await statPath(
        c.var.services,
        c.var.tenantId,
        c.req.valid("param").id,
        q.path,
        q.follow_links === "true",
      ),
      200,
    );
  });
  app.openapi(statsRoute, async (c) =>
    c.json(await instanceStats(c.var.services, c.var.tenantId, c.req.valid("param").id), 200),
  );
}
