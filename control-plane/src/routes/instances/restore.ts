import { createRoute } from "@hono/zod-openapi";
import { restoreInstance } from "../../services/instances/restore.ts";
import { errorsFor, IdParam, type Router, security } from "../common.ts";
import { instanceOk } from "./common.ts";

const route = createRoute({
  method: "post",
  path: "/instances/{id}/restore",
  summary: "Restore an instance from standby",
  security,
  request: { params: IdParam },
  responses: {
    200: instanceOk("Restored"),
    ...errorsFor(401, 404, 409, 503),
  },
});

export function registerRestoreInstance(app: Router) {
  app.openapi(route, async (c) =>
    c.json(
      await restoreInstance(c.var.services, c.var.tenantId, c.req.valid("param").id, c.var.call),
      200,
    ),
  );
}
