// The console's one way to the API: same origin, the API key as a bearer token, and every
// failure as an ApiError carrying the API's own `{code, message}`.
import type { ErrorBody, StreamToken } from "@offshoot/shared";

const KEY = "offshoot.apiKey";

/** The key lives in this tab's session storage only: never in a URL, a cookie or a log. */
export const session = {
  key: (): string | null => sessionStorage.getItem(KEY),
  signIn: (key: string) => sessionStorage.setItem(KEY, key),
  signOut: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

async function failure(res: Response): Promise<ApiError> {
  const text = await res.text().catch(() => "");
  try {
    const body = JSON.parse(text) as Partial<ErrorBody>;
    if (typeof body.message === "string") {
      return new ApiError(res.status, body.code ?? "error", body.message);
    }
  } catch {
    // not JSON: fall through to the status line
  }
  return new ApiError(res.status, "error", `${res.status} ${res.statusText || "error"}`.trim());
}

/** A fetch whose failures are ApiErrors: the API's `{code, message}`, or "cannot be reached"
 * (an abort stays an abort). */
async function send(path: string, init: RequestInit): Promise<Response> {
  let res: Response;
  try {
    res = await fetch(path, init);
  } catch (e) {
    if (init.signal?.aborted) throw e;
    throw new ApiError(0, "network", "the control plane cannot be reached");
  }
  if (!res.ok) throw await failure(res);
  return res;
}

export async function request<T>(
  method: string,
  path: string,
  body?: unknown,
  opts: { key?: string; signal?: AbortSignal; headers?: Record<string, string> } = {},
): Promise<T> {
  const key = opts.key ?? session.key();
  const res = await send(path, {
    method,
    signal: opts.signal,
    headers: {
      ...(key && { authorization: `Bearer ${key}` }),
      ...(body !== undefined && { "content-type": "application/json" }),
      ...opts.headers,
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 204) return undefined as T;
  return (await res.json()) as T;
}

export const api = {
  get: <T>(path: string, signal?: AbortSignal) => request<T>("GET", path, undefined, { signal }),
  post: <T>(path: string, body?: unknown) => request<T>("POST", path, body ?? {}),
  del: (path: string) => request<void>("DELETE", path),
};

export const enc = encodeURIComponent;

/** One Server-Sent Events frame. */
export interface SseFrame {
  id?: string;
  event?: string;
  data: string;
}

/**
 * Reads a Server-Sent Events response with the API key in a header (EventSource cannot send
 * one). Calls `onFrame` for each event until the stream ends (resolves) or `signal` aborts.
 */
export async function readSse(
  path: string,
  onFrame: (f: SseFrame) => void,
  opts: { signal: AbortSignal; headers?: Record<string, string>; onOpen?: () => Promise<void> },
): Promise<void> {
  const res = await send(path, {
    signal: opts.signal,
    headers: {
      accept: "text/event-stream",
      authorization: `Bearer ${session.key()}`,
      ...opts.headers,
    },
  });
  if (!res.body) throw new ApiError(res.status, "error", "the response has no body to stream");
  await opts.onOpen?.();
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffered += value.replace(/\r\n?/g, "\n");
    for (let end = buffered.indexOf("\n\n"); end >= 0; end = buffered.indexOf("\n\n")) {
      const block = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      const frame: SseFrame = { data: "" };
      const data: string[] = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const v = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") data.push(v);
        else if (field === "id") frame.id = v;
        else if (field === "event") frame.event = v;
      }
      if (data.length === 0) continue;
      frame.data = data.join("\n");
      onFrame(frame);
    }
  }
}

/** A WebSocket to an instance's exec or cp, opened with a single-use stream token. */
export async function guestSocket(instance: string, kind: "exec" | "cp"): Promise<WebSocket> {
  const { token } = await api.post<StreamToken>("/auth/stream-token");
  const url = new URL(`/instances/${enc(instance)}/${kind}`, location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("token", token);
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  return ws;
}
