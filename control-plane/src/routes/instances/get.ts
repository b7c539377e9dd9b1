import { createRoute } from "@hono/zod-openapi";
import { getInstance } from "../../services/instances/get.ts";
import { errorsFor, IdParam, type Router, security } from "../common.ts";
import { instanceOk } from "./common.ts";

const route = createRoute({
  method: "get",
  path: "/instances/{id}",
  summary: "Get an instance",
  security,
  request: { params: IdParam },
  responses: {
    200: instanceOk("Instance"),
    ...errorsFor(401, 404, 409),
  },
});

export function registerGetInstance(app: Router) {
  app.openapi(route, async (c) =>
    c.json(await getInstance(c.var.services, c.var.tenantId, c.req.valid("param").id), 200),
  );
}
