import { createRoute } from "@hono/zod-openapi";
import { StartInstanceRequest } from "@offshoot/shared";
import { startInstance } from "../../services/instances/start.ts";
import { errorsFor, IdParam, json, type Router, security } from "../common.ts";
import { instanceOk } from "./common.ts";

const route = createRoute({
  method: "post",
  path: "/instances/{id}/start",
  summary: "Start a stopped instance",
  security,
  request: { params: IdParam, body: { content: json(StartInstanceRequest), required: false } },
  responses: {
    200: instanceOk("Started"),
    ...errorsFor(401, 404, 409, 503),
  },
});

export function registerStartInstance(app: Router) {
  app.openapi(route, async (c) => {
    // The body is optional: none means start with the instance's own entrypoint and cmd.
    const body = (c.req.valid("json") as StartInstanceRequest | undefined) ?? {};
    return c.json(
      await startInstance(
        c.var.services,
        c.var.tenantId,
        c.req.valid("param").id,
        body,
        c.var.call,
      ),
      200,
    );
  });
}
