import { createRoute, z } from "@hono/zod-openapi";
import { TenantEvent } from "@offshoot/shared";
import { streamSSE } from "hono/streaming";
import { topics } from "../services/context.ts";
import {
  EVENT_KEEPALIVE_MS,
  eventsAfter,
  newestEventId,
  openEventStream,
} from "../services/events.ts";
import { errorsFor, type Router, security } from "./common.ts";

const route = createRoute({
  method: "get",
  path: "/events",
  summary: "Stream the tenant's events (SSE)",
  description:
    "What happens to the tenant's instances, as Server-Sent Events whose `data` is an `Event` (JSON) and whose `id` is the event's: `instance.created`, `instance.state` (every change of state, with its cause), `instance.deleted`. Starts with the events after `after` (or the `Last-Event-ID` header, to resume), else with the next new one; a comment every 15 s keeps a quiet stream open. At most 16 streams per tenant are open at once (429 beyond).",
  security,
  request: {
    query: z.object({
      after: z.coerce
        .number()
        .int()
        .min(0)
        .optional()
        .openapi({
          param: { name: "after", in: "query" },
          description: "Send the events after this id first (Last-Event-ID takes precedence)",
        }),
    }),
  },
  responses: {
    200: {
      description: "Event stream; each event's data is an Event",
      content: { "text/event-stream": { schema: z.string() } },
    },
    ...errorsFor(400, 401, 429),
  },
});

const lastEventId = z.coerce.number().int().min(0);

export function registerEventRoutes(app: Router) {
  // Each event's data: listed as a schema of its own, since the stream's body is text.
  app.openAPIRegistry.register("Event", TenantEvent);
  app.openapi(route, async (c) => {
    const s = c.var.services;
    const tenantId = c.var.tenantId;
    const resumed = lastEventId.safeParse(c.req.header("last-event-id"));
    const given = resumed.success ? resumed.data : c.req.valid("query").after;
    const place = openEventStream(tenantId);
    let cursor: number;
    try {
      cursor = given ?? (await newestEventId(s, tenantId));
    } catch (e) {
      place.release();
      throw e;
    }
    // The client's going away is seen on the request's signal (Node's server; Workers with
    // enable_request_signal) or as the stream's cancellation.
    const gone = c.req.raw.signal;
    return streamSSE(c, async (stream) => {
      const aborted = new AbortController();
      const stop = () => aborted.abort();
      gone.addEventListener("abort", stop);
      stream.onAbort(stop);
      try {
        while (!aborted.signal.aborted && !gone.aborted) {
          const batch = await s.signals.until(
            topics.events(tenantId),
            EVENT_KEEPALIVE_MS,
            async () => {
              place.renew();
              const found = await eventsAfter(s, tenantId, cursor);
              return found.length > 0 ? found : undefined;
            },
            { signal: aborted.signal },
          );
          if (aborted.signal.aborted) break;
          if (!batch) {
            await stream.write(": keepalive\n\n");
            continue;
          }
          for (const e of batch) {
            await stream.writeSSE({ id: String(e.id), event: e.type, data: JSON.stringify(e) });
            cursor = e.id;
          }
        }
      } catch (e) {
        // The database went away (or the like): the stream ends saying why; the client
        // reconnects with Last-Event-ID and misses nothing.
        const message = e instanceof Error ? e.message : String(e);
        await stream
          .writeSSE({ event: "error", data: JSON.stringify({ message }) })
          .catch(() => {});
      } finally {
        gone.removeEventListener("abort", stop);
        place.release();
      }
    }) as never;
  });
}
