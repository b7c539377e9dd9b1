import { OpenAPIHono, z } from "@hono/zod-openapi";
import { ErrorBody } from "@offshoot/shared";
import type { Call, Services } from "../services/context.ts";

export interface AppEnv {
  Variables: {
    services: Services;
    tenantId: string;
    agentHost: { id: string; name: string };
    /** The request's deadline and its client's signal (see requestDeadline in app.ts). */
    call: Call;
  };
}

/** Zod issues as one readable sentence: `name: must be lowercase…; vcpus: expected number`. */
export function describeIssues(error: z.ZodError): string {
  return error.issues
    .slice(0, 5)
    .map((i) => (i.path.length ? `${i.path.join(".")}: ${i.message}` : i.message))
    .join("; ");
}

export function newRouter() {
  return new OpenAPIHono<AppEnv>({
    defaultHook: (result, c) => {
      if (!result.success) {
        return c.json({ code: "invalid_request", message: describeIssues(result.error) }, 400, {
          "x-should-retry": "false",
        });
      }
      return undefined;
    },
  });
}
export type Router = ReturnType<typeof newRouter>;

const errorContent = { "application/json": { schema: ErrorBody } };
const errors = {
  400: { description: "Invalid request", content: errorContent },
  401: { description: "Missing or invalid API key", content: errorContent },
  404: { description: "Not found", content: errorContent },
  409: {
    description: "Conflict: invalid state, name taken, ambiguous id or no capacity",
    content: errorContent,
  },
  429: { description: "Too many at once", content: errorContent },
  500: { description: "Internal error", content: errorContent },
  501: { description: "Not supported", content: errorContent },
  503: { description: "The instance's host is not connected", content: errorContent },
  504: {
    description: "The host did not answer in time; the operation continues",
    content: errorContent,
  },
} as const;
type ErrorStatus = keyof typeof errors;

/** A route's error answers, by status: `...errorsFor(400, 404)` among its responses. */
export function errorsFor<S extends ErrorStatus>(...statuses: S[]): Pick<typeof errors, S> {
  return Object.fromEntries(statuses.map((s) => [s, errors[s]])) as Pick<typeof errors, S>;
}

/** A JSON request or response body of `schema`. */
export const json = <T extends z.ZodType>(schema: T) => ({ "application/json": { schema } });

export const IdParam = z.object({
  id: z.string().openapi({
    param: { name: "id", in: "path" },
    description: "Instance id, name or unique id prefix",
  }),
});

export const security = [{ bearerAuth: [] }];
