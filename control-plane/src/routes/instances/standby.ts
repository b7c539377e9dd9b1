import { createRoute } from "@hono/zod-openapi";
import { StandbyInstanceRequest } from "@offshoot/shared";
import { standbyInstance } from "../../services/instances/standby.ts";
import { errorsFor, IdParam, json, type Router, security } from "../common.ts";
import { instanceOk } from "./common.ts";

const route = createRoute({
  method: "post",
  path: "/instances/{id}/standby",
  summary: "Put an instance in standby (pause, snapshot, release the VMM)",
  security,
  request: {
    params: IdParam,
    body: { content: json(StandbyInstanceRequest), required: false },
  },
  responses: {
    200: instanceOk("In standby"),
    ...errorsFor(400, 401, 404, 409, 501, 503),
  },
});

export function registerStandbyInstance(app: Router) {
  app.openapi(route, async (c) =>
    c.json(
      await standbyInstance(c.var.services, c.var.tenantId, c.req.valid("param").id, c.var.call),
      200,
    ),
  );
}
