import { createRoute } from "@hono/zod-openapi";
import { stopInstance } from "../../services/instances/stop.ts";
import { errorsFor, IdParam, type Router, security } from "../common.ts";
import { instanceOk } from "./common.ts";

const route = createRoute({
  method: "post",
  path: "/instances/{id}/stop",
  summary: "Stop an instance (graceful shutdown)",
  security,
  request: { params: IdParam },
  responses: {
    200: instanceOk("Stopped"),
    ...errorsFor(401, 404, 409, 503),
  },
});

export function registerStopInstance(app: Router) {
  app.openapi(route, async (c) =>
    c.json(
      await stopInstance(c.var.services, c.var.tenantId, c.req.valid("param").id, c.var.call),
      200,
    ),
  );
}
