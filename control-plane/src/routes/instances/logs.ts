import { createRoute, z } from "@hono/zod-openapi";
import { LogSource } from "@offshoot/shared";
import { streamSSE } from "hono/streaming";
import { openLogs } from "../../services/instances/logs.ts";
import { errorsFor, IdParam, type Router, security } from "../common.ts";

const route = createRoute({
  method: "get",
  path: "/instances/{id}/logs",
  summary: "Stream instance logs (SSE)",
  description:
    "The last `tail` lines of a log, then with `follow=true` the lines that follow. Each event's data is one line as a JSON string. source: app (the guest's serial console), vmm (the hypervisor's output), hypeman (operations run on the instance).",
  security,
  request: {
    params: IdParam,
    query: z.object({
      tail: z.coerce
        .number()
        .int()
        .min(0)
        .max(100_000)
        .default(100)
        .openapi({
          param: { name: "tail", in: "query" },
          description: "How many of the last lines to send first",
        }),
      follow: z
        .enum(["true", "false"])
        .default("false")
        .openapi({
          param: { name: "follow", in: "query" },
          description:
            "Keep sending lines as they are written; a guest console's stream ends once the guest is Stopped",
        }),
      source: LogSource.default("app").openapi({
        param: { name: "source", in: "query" },
        description:
          "app: the guest's console; vmm: the hypervisor's output; hypeman: the operations run on the instance",
      }),
    }),
  },
  responses: {
    200: {
      description: "Log stream",
      content: { "text/event-stream": { schema: z.string() } },
    },
    ...errorsFor(400, 401, 404, 503),
  },
});

export function registerInstanceLogs(app: Router) {
  app.openapi(route, async (c) => {
    const q = c.req.valid("query");
    const logs = await openLogs(c.var.services, c.var.tenantId, c.req.valid("param").id, {
      tail: q.tail,
      follow: q.follow === "true",
      source: q.source,
    });
    return streamSSE(c, async (stream) => {
      await new Promise<void>((done) => {
        stream.onAbort(() => {
          logs.cancel();
          done();
        });
        // Writes are chained, and the end waits for them: lines and end may arrive together
        // (a buffered or relayed stream), and the response closes when `done` resolves. A
        // chunk counts as taken once written, which waits for the client to read: a slow
        // client slows the host, and holds at most the stream's window here.
        let writing = Promise.resolve();
        logs.attach({
          lines: (lines) => {
            for (const line of lines) {
              writing = writing.then(() => stream.writeSSE({ data: JSON.stringify(line) }));
            }
            return writing;
          },
          end: (error) => {
            // A stream cut short says why, as its last event.
            if (error) {
              writing = writing.then(() =>
                stream.writeSSE({ event: "error", data: JSON.stringify(error.message) }),
              );
            }
            void writing.then(done, done);
          },
        });
      });
    }) as never;
  });
}
