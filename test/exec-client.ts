// A plain WebSocket client of Hypeman's exec protocol (GET /instances/{id}/exec), as a program
// other than the official client would write it: the start message, stdin as binary frames,
// output as binary frames, `{"exitCode":N}` last.
import WebSocket from "ws";

export interface ExecOutcome {
  /** Every binary message, concatenated. */
  output: Buffer;
  /** Text messages other than the exit code. */
  texts: string[];
  exitCode: number | undefined;
  closeCode: number;
  closeReason: string;
}

export interface ExecOptions {
  /** Sent as binary frames after the start message. */
  stdin?: Array<string | Buffer>;
  /** Send `{"close_stdin":true}` after stdin. */
  closeStdin?: boolean;
  /** Called once the socket is open, with it (resize, more stdin). */
  onOpen?: (ws: WebSocket) => void;
  /** Called with each binary message as it arrives. */
  onOutput?: (chunk: Buffer, ws: WebSocket) => void;
}

/** The socket for an instance's exec, authenticated with the API key. */
export function execSocket(cpUrl: string, apiKey: string, instance: string): WebSocket {
  return guestSocket(cpUrl, apiKey, instance, "exec");
}

/** The socket for an instance's cp. */
export function cpSocket(cpUrl: string, apiKey: string, instance: string): WebSocket {
  return guestSocket(cpUrl, apiKey, instance, "cp");
}

/** `instance` empty: `cpUrl` is the socket's whole URL, and `apiKey` empty: no header. */
function guestSocket(cpUrl: string, apiKey: string, instance: string, kind: string): WebSocket {
  const url = instance
    ? new URL(`/instances/${encodeURIComponent(instance)}/${kind}`, cpUrl)
    : new URL(cpUrl);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return new WebSocket(url, apiKey ? { headers: { authorization: `Bearer ${apiKey}` } } : {});
}

/** Runs one exec to its end. Rejects on an HTTP answer instead of an upgrade (with its status
 * and body). */
export function execOnce(
  cpUrl: string,
  apiKey: string,
  instance: string,
  start: Record<string, unknown>,
  opts: ExecOptions = {},
): Promise<ExecOutcome> {
  const ws = execSocket(cpUrl, apiKey, instance);
  const chunks: Buffer[] = [];
  const texts: string[] = [];
  let exitCode: number | undefined;
  return new Promise((resolve, reject) => {
    ws.on("unexpected-response", (_req, res) => {
      let body = "";
      res.on("data", (d: Buffer) => {
        body += d.toString();
      });
      res.on("end", () => {
        // A refused upgrade's body may not arrive (Node's adapter drops it): the error is in
        // x-error-code and x-error-message then.
        const code = res.headers["x-error-code"];
        const message = res.headers["x-error-message"];
        const error = body || (code ? JSON.stringify({ code, message }) : "");
        reject(
          Object.assign(new Error(`HTTP ${res.statusCode}: ${error}`), {
            status: res.statusCode,
            body: error,
          }),
        );
      });
    });
    ws.on("error", reject);
    ws.on("open", () => {
      ws.send(JSON.stringify(start));
      for (const s of opts.stdin ?? []) ws.send(typeof s === "string" ? Buffer.from(s) : s);
      if (opts.closeStdin) ws.send(JSON.stringify({ close_stdin: true }));
      opts.onOpen?.(ws);
    });
    ws.on("message", (data, isBinary) => {
      const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data as ArrayBuffer);
      if (isBinary) {
        chunks.push(buf);
        opts.onOutput?.(buf, ws);
        return;
      }
      const text = buf.toString("utf8");
      try {
        const msg = JSON.parse(text) as { exitCode?: unknown };
        if (typeof msg.exitCode === "number") {
          exitCode = msg.exitCode;
          return;
        }
      } catch {
        // not JSON
      }
      texts.push(text);
    });
    ws.on("close", (code, reason) =>
      resolve({
        output: Buffer.concat(chunks),
        texts,
        exitCode,
        closeCode: code,
        closeReason: reason.toString(),
      }),
    );
  });
}
