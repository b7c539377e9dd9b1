import { createRoute } from "@hono/zod-openapi";
import { deleteInstance } from "../../services/instances/delete.ts";
import { errorsFor, IdParam, type Router, security } from "../common.ts";

const route = createRoute({
  method: "delete",
  path: "/instances/{id}",
  summary: "Stop and delete an instance",
  security,
  request: { params: IdParam },
  responses: {
    204: { description: "Deleted" },
    ...errorsFor(401, 404, 409),
  },
});

export function registerDeleteInstance(app: Router) {
  app.openapi(route, async (c) => {
    await deleteInstance(c.var.services, c.var.tenantId, c.req.valid("param").id, c.var.call);
    return c.body(null, 204);
  });
}
