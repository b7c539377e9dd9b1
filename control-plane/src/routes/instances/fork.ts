import { createRoute } from "@hono/zod-openapi";
import { ForkInstanceRequest } from "@offshoot/shared";
import { forkInstance } from "../../services/instances/fork.ts";
import { errorsFor, IdParam, json, type Router, security } from "../common.ts";
import { instanceOk } from "./common.ts";

const route = createRoute({
  method: "post",
  path: "/instances/{id}/fork",
  summary: "Fork an instance from Stopped, Standby, or Running (with from_running=true)",
  security,
  request: { params: IdParam, body: { content: json(ForkInstanceRequest), required: true } },
  responses: {
    201: instanceOk("Forked instance created"),
    ...errorsFor(400, 401, 404, 409, 501, 503, 504),
  },
});

export function registerForkInstance(app: Router) {
  app.openapi(route, async (c) =>
    c.json(
      await forkInstance(
        c.var.services,
        c.var.tenantId,
        c.req.valid("param").id,
        c.req.valid("json"),
        c.var.call,
      ),
      201,
    ),
  );
}
