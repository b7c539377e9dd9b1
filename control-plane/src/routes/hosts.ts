import { createRoute, z } from "@hono/zod-openapi";
import { HostView } from "@offshoot/shared";
import { hostsForTenant } from "../services/hosts.ts";
import { errorsFor, json, type Router, security } from "./common.ts";

export function registerHostRoutes(app: Router) {
  app.openapi(
    createRoute({
      method: "get",
      path: "/hosts",
      summary: "List hosts and their capacity",
      description:
        "Every host, as the tenant sees it: connected or not, its last heartbeat, the vCPUs and memory all tenants' instances hold on it and what is free (overcommit included), and how many of the tenant's own instances it holds. An extension of Hypeman's API, which has one host (GET /resources).",
      security,
      responses: {
        200: { description: "Hosts, by name", content: json(z.array(HostView)) },
        ...errorsFor(401),
      },
    }),
    async (c) => c.json(await hostsForTenant(c.var.services, c.var.tenantId), 200),
  );
}
