import { createRoute } from "@hono/zod-openapi";
import { CreateInstanceRequest } from "@offshoot/shared";
import { createInstance } from "../../services/instances/create.ts";
import { errorsFor, json, type Router, security } from "../common.ts";
import { instanceOk } from "./common.ts";

const route = createRoute({
  method: "post",
  path: "/instances",
  summary: "Create and start an instance",
  security,
  request: { body: { content: json(CreateInstanceRequest), required: true } },
  responses: {
    201: instanceOk("Instance created"),
    ...errorsFor(400, 401, 409, 501),
  },
});

export function registerCreateInstance(app: Router) {
  app.openapi(route, async (c) =>
    c.json(
      await createInstance(c.var.services, c.var.tenantId, c.req.valid("json"), c.var.call),
      201,
    ),
  );
}
