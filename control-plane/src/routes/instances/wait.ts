import { createRoute, z } from "@hono/zod-openapi";
import { InstanceState, WaitForStateResponse } from "@offshoot/shared";
import { parseWaitTimeout, waitForState } from "../../services/instances/wait.ts";
import { errorsFor, IdParam, json, type Router, security } from "../common.ts";

const route = createRoute({
  method: "get",
  path: "/instances/{id}/wait",
  summary: "Wait for an instance to reach a state",
  description:
    'Returns when the state is reached, on timeout (Go duration, default "60s", capped at 5m), or when the instance becomes Unknown.',
  security,
  request: {
    params: IdParam,
    query: z.object({
      state: InstanceState.openapi({
        param: { name: "state", in: "query" },
        description: "The state to wait for",
      }),
      timeout: z
        .string()
        .max(32)
        .optional()
        .openapi({
          param: { name: "timeout", in: "query" },
          description:
            'How long to wait, as a Go duration ("30s", "2m"); default "60s", at most 5m',
          example: "60s",
        }),
    }),
  },
  responses: {
    200: { description: "Wait finished", content: json(WaitForStateResponse) },
    ...errorsFor(400, 401, 404),
  },
});

export function registerWaitForState(app: Router) {
  app.openapi(route, async (c) => {
    const q = c.req.valid("query");
    const timeoutMs = parseWaitTimeout(q.timeout);
    return c.json(
      await waitForState(
        c.var.services,
        c.var.tenantId,
        c.req.valid("param").id,
        q.state,
        timeoutMs,
        c.req.raw.signal,
      ),
      200,
    );
  });
}
