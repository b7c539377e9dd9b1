import { createRoute, z } from "@hono/zod-openapi";
import { Instance, InstanceState, InvalidRequestError, Tags } from "@offshoot/shared";
import { listInstances } from "../../services/instances/list.ts";
import { describeIssues, errorsFor, json, type Router, security } from "../common.ts";

const route = createRoute({
  method: "get",
  path: "/instances",
  summary: "List instances",
  description: "Filter by `state` and by tags with `tags[key]=value` (all must match).",
  security,
  request: { query: z.object({ state: InstanceState.optional() }) },
  responses: {
    200: { description: "Instances", content: json(z.array(Instance)) },
    ...errorsFor(400, 401),
  },
});

export function registerListInstances(app: Router) {
  app.openapi(route, async (c) => {
    const { state } = c.req.valid("query");
    const pages = listInstances(c.var.services, c.var.tenantId, {
      state,
      tags: tagsOf(c.req.queries()),
    });
    // The first page is read before answering, so a failure is still a proper error; the
    // rest is sent as it is read (a failure then cuts the response short).
    const first = await pages.next();
    const encoder = new TextEncoder();
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        const page = sent === 0 ? first : await pages.next();
        if (page.done) {
          controller.enqueue(encoder.encode(sent === 0 ? "[]" : "]"));
          controller.close();
          return;
        }
        const items = page.value.map((i) => JSON.stringify(i)).join(",");
        controller.enqueue(encoder.encode(`${sent === 0 ? "[" : ","}${items}`));
        sent += page.value.length;
      },
      async cancel() {
        await pages.return(undefined);
      },
    });
    return c.body(body, 200, { "content-type": "application/json" }) as never;
  });
}

/** The `tags[key]=value` filters of a query (the last value of a repeated key wins). */
function tagsOf(queries: Record<string, string[]>): Tags {
  const tags: Record<string, string> = {};
  for (const [key, values] of Object.entries(queries)) {
    const m = /^tags\[(.*)\]$/.exec(key);
    if (m?.[1] !== undefined) tags[m[1]] = values.at(-1) ?? "";
  }
  const parsed = Tags.safeParse(tags);
  if (!parsed.success) throw new InvalidRequestError(`tags: ${describeIssues(parsed.error)}`);
  return parsed.data;
}
