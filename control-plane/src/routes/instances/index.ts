import { createRoute, z } from "@hono/zod-openapi";
import {
  CreateInstanceRequest,
  ForkInstanceRequest,
  Instance,
  InstanceState,
  InvalidRequestError,
  LogSource,
  StandbyInstanceRequest,
  StartInstanceRequest,
  Tags,
  WaitForStateResponse,
} from "@offshoot/shared";
import { streamSSE } from "hono/streaming";
import { createInstance } from "../../services/instances/create.ts";
import { deleteInstance } from "../../services/instances/delete.ts";
import { forkInstance } from "../../services/instances/fork.ts";
import { getInstance } from "../../services/instances/get.ts";
import { listInstances } from "../../services/instances/list.ts";
import { openLogs } from "../../services/instances/logs.ts";
import { restoreInstance } from "../../services/instances/restore.ts";
import { standbyInstance } from "../../services/instances/standby.ts";
import { startInstance } from "../../services/instances/start.ts";
import { stopInstance } from "../../services/instances/stop.ts";
import { parseWaitTimeout, waitForState } from "../../services/instances/wait.ts";
import { describeIssues, errors, IdParam, type Router, security } from "../common.ts";

// Thin transport: validate, call one service verb, return. Errors are mapped in app.ts.

const json = <T extends z.ZodType>(schema: T) => ({ "application/json": { schema } });
const instanceOk = (description: string) => ({ description, content: json(Instance) });

export function registerInstanceRoutes(app: Router) {
  app.openapi(
    createRoute({
      method: "post",
      path: "/instances",
      summary: "Create and start an instance",
      security,
      request: { body: { content: json(CreateInstanceRequest), required: true } },
      responses: {
        201: instanceOk("Instance created"),
        400: errors[400],
        401: errors[401],
        409: errors[409],
        501: errors[501],
      },
    }),
    async (c) =>
      c.json(
        await createInstance(c.var.services, c.var.tenantId, c.req.valid("json"), c.var.call),
        201,
      ),
  );

  app.openapi(
    createRoute({
      method: "get",
      path: "/instances",
      summary: "List instances",
      description: "Filter by `state` and by tags with `tags[key]=value` (all must match).",
      security,
      request: { query: z.object({ state: InstanceState.optional() }) },
      responses: {
        200: { description: "Instances", content: json(z.array(Instance)) },
        400: errors[400],
        401: errors[401],
      },
    }),
    async (c) => {
      const tags: Record<string, string> = {};
      for (const [key, values] of Object.entries(c.req.queries())) {
        const m = /^tags\[(.*)\]$/.exec(key);
        if (m?.[1] !== undefined) tags[m[1]] = values.at(-1) ?? "";
      }
      const parsedTags = Tags.safeParse(tags);
      if (!parsedTags.success)
        throw new InvalidRequestError(`tags: ${describeIssues(parsedTags.error)}`);
      const { state } = c.req.valid("query");
      const pages = listInstances(c.var.services, c.var.tenantId, { state, tags: parsedTags.data });
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
    },
  );

  app.openapi(
    createRoute({
      method: "get",
      path: "/instances/{id}",
      summary: "Get an instance",
      security,
      request: { params: IdParam },
      responses: {
        200: instanceOk("Instance"),
        401: errors[401],
        404: errors[404],
        409: errors[409],
      },
    }),
    async (c) =>
      c.json(await getInstance(c.var.services, c.var.tenantId, c.req.valid("param").id), 200),
  );

  app.openapi(
    createRoute({
      method: "delete",
      path: "/instances/{id}",
      summary: "Stop and delete an instance",
      security,
      request: { params: IdParam },
      responses: {
        204: { description: "Deleted" },
        401: errors[401],
        404: errors[404],
        409: errors[409],
      },
    }),
    async (c) => {
      await deleteInstance(c.var.services, c.var.tenantId, c.req.valid("param").id, c.var.call);
      return c.body(null, 204);
    },
  );

  app.openapi(
    createRoute({
      method: "post",
      path: "/instances/{id}/start",
      summary: "Start a stopped instance",
      security,
      request: { params: IdParam, body: { content: json(StartInstanceRequest), required: false } },
      responses: {
        200: instanceOk("Started"),
        401: errors[401],
        404: errors[404],
        409: errors[409],
        503: errors[503],
      },
    }),
    async (c) => {
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
    },
  );

  app.openapi(
    createRoute({
      method: "post",
      path: "/instances/{id}/stop",
      summary: "Stop an instance (graceful shutdown)",
      security,
      request: { params: IdParam },
      responses: {
        200: instanceOk("Stopped"),
        401: errors[401],
        404: errors[404],
        409: errors[409],
        503: errors[503],
      },
    }),
    async (c) =>
      c.json(
        await stopInstance(c.var.services, c.var.tenantId, c.req.valid("param").id, c.var.call),
        200,
      ),
  );

  app.openapi(
    createRoute({
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
        400: errors[400],
        401: errors[401],
        404: errors[404],
        409: errors[409],
        501: errors[501],
        503: errors[503],
      },
    }),
    async (c) =>
      c.json(
        await standbyInstance(c.var.services, c.var.tenantId, c.req.valid("param").id, c.var.call),
        200,
      ),
  );

  app.openapi(
    createRoute({
      method: "post",
      path: "/instances/{id}/restore",
      summary: "Restore an instance from standby",
      security,
      request: { params: IdParam },
      responses: {
        200: instanceOk("Restored"),
        401: errors[401],
        404: errors[404],
        409: errors[409],
        503: errors[503],
      },
    }),
    async (c) =>
      c.json(
        await restoreInstance(c.var.services, c.var.tenantId, c.req.valid("param").id, c.var.call),
        200,
      ),
  );

  app.openapi(
    createRoute({
      method: "post",
      path: "/instances/{id}/fork",
      summary: "Fork an instance from Stopped, Standby, or Running (with from_running=true)",
      security,
      request: { params: IdParam, body: { content: json(ForkInstanceRequest), required: true } },
      responses: {
        201: instanceOk("Forked instance created"),
        400: errors[400],
        401: errors[401],
        404: errors[404],
        409: errors[409],
        501: errors[501],
        503: errors[503],
        504: errors[504],
      },
    }),
    async (c) =>
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

  app.openapi(
    createRoute({
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
        400: errors[400],
        401: errors[401],
        404: errors[404],
      },
    }),
    async (c) => {
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
    },
  );

  app.openapi(
    createRoute({
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
        400: errors[400],
        401: errors[401],
        404: errors[404],
        503: errors[503],
      },
    }),
    async (c) => {
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
    },
  );
}
