// What the Worker and a HostSession Durable Object send each other (fetch requests between the
// two, inside the control plane: not part of the public contract). Each side parses what it
// receives; a malformed request is answered 400 with the reason. /command's body is a recorded
// `Command` and /logs' body a `LogQuery`, both as shared/ defines them.
import { AGENT_LIMITS, CommandError } from "@offshoot/shared";
import { z } from "zod";

/** /connect: the host whose token the Worker checked, in the `x-offshoot-host` header. */
export const SessionHost = z.object({ id: z.string().min(1), name: z.string() });
export type SessionHost = z.infer<typeof SessionHost>;
export const HOST_HEADER = "x-offshoot-host";

/** /command's answer (text): `done` once the agent's result is recorded; `sent` when it did
 * not come in time (the request finds it in Postgres); `queued` when no agent is connected (the
 * command goes out on its next hello). */
export const CommandOutcome = z.enum(["queued", "sent", "done"]);
export type CommandOutcome = z.infer<typeof CommandOutcome>;

/** /logs' answer is NDJSON: `{lines}` lines, then one `{done, error?}`. */
export const LogLines = z.object({ lines: z.array(z.string()) });
export const LogEnd = z.object({ done: z.literal(true), error: CommandError.optional() });
export const LogStreamLine = z.union([LogLines, LogEnd]);
export type LogStreamLine = z.infer<typeof LogStreamLine>;

/** The longest line a log stream can hold, in characters: one agent chunk's lines, every
 * character escaped by JSON at its longest (6, `\u001f`), each line with its quotes and comma.
 * A longer line did not come from a HostSession; the stream ends there. */
export const MAX_LOG_LINE_CHARS = 6 * AGENT_LIMITS.logChunkChars + 3 * AGENT_LIMITS.logLines + 64;

/** 400 with the first issue, in the control plane's error shape. */
export function invalid(what: string, error: z.ZodError | string): Response {
  const issue =
    typeof error === "string"
      ? error
      : `${error.issues[0]?.path.join(".") ?? ""} ${error.issues[0]?.message ?? "invalid"}`;
  return new Response(
    JSON.stringify({ code: "invalid_request", message: `${what}: ${issue.trim()}` }),
    { status: 400, headers: { "content-type": "application/json" } },
  );
}

/** The request's JSON body checked against `schema`, or the 400 that answers it. */
export async function readBody<T>(
  req: Request,
  schema: z.ZodType<T>,
  what: string,
): Promise<{ ok: true; body: T } | { ok: false; response: Response }> {
  let raw: unknown;
  try {
    raw = await req.json();
  } catch {
    return { ok: false, response: invalid(what, "not JSON") };
  }
  const parsed = schema.safeParse(raw);
  return parsed.success
    ? { ok: true, body: parsed.data }
    : { ok: false, response: invalid(what, parsed.error) };
}
