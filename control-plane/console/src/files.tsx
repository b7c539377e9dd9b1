// Copying files into and out of a running guest: Hypeman's cp protocol over a WebSocket
// (opened with a stream token). An upload sends the file's bytes as binary frames, then
// {"type":"end"}, and reads the result; a download reads a header, the bytes, and the end.
import { useState } from "preact/hooks";
import { guestSocket } from "./api.ts";
import { ErrorNote, useAction } from "./ui.tsx";

/** Bytes per frame sent, and the most left unsent in the socket before waiting. */
const CHUNK = 64 * 1024;
const HIGH_WATER = 1024 * 1024;
/** The largest file a download holds in the page's memory. */
export const DOWNLOAD_MAX_BYTES = 256 * 1024 * 1024;

interface CpMessage {
  type?: string;
  success?: boolean;
  error?: string;
  message?: string;
  is_dir?: boolean;
  final?: boolean;
  bytes_written?: number;
}

function open(instance: string, start: Record<string, unknown>) {
  return guestSocket(instance, "cp").then(
    (ws) =>
      new Promise<WebSocket>((resolve, reject) => {
        ws.onopen = () => {
          ws.send(JSON.stringify(start));
          resolve(ws);
        };
        ws.onerror = () => reject(new Error("the copy's connection failed"));
      }),
  );
}

async function upload(instance: string, file: File, dir: string): Promise<number> {
  const path = `${dir.replace(/\/+$/, "")}/${file.name}`;
  const ws = await open(instance, { direction: "to", guest_path: path, mode: 0o644 });
  const result = new Promise<number>((resolve, reject) => {
    ws.onmessage = (m) => {
      if (typeof m.data !== "string") return;
      const msg = JSON.parse(m.data) as CpMessage;
      if (msg.type === "result") {
        if (msg.success) resolve(msg.bytes_written ?? file.size);
        else reject(new Error(msg.error ?? "the copy failed"));
      } else if (msg.type === "error") reject(new Error(msg.message ?? "the copy failed"));
    };
    ws.onclose = (e) => reject(new Error(e.reason || "the copy's connection closed"));
  });
  for (let at = 0; at < file.size; at += CHUNK) {
    while (ws.bufferedAmount > HIGH_WATER) await new Promise((r) => setTimeout(r, 20));
    ws.send(await file.slice(at, at + CHUNK).arrayBuffer());
  }
  ws.send(JSON.stringify({ type: "end" }));
  try {
    return await result;
  } finally {
    ws.close(1000);
  }
}

async function download(instance: string, path: string): Promise<Blob> {
  const ws = await open(instance, { direction: "from", guest_path: path });
  const parts: ArrayBuffer[] = [];
  let size = 0;
  try {
    return await new Promise<Blob>((resolve, reject) => {
      ws.onmessage = (m) => {
        if (typeof m.data !== "string") {
          size += (m.data as ArrayBuffer).byteLength;
          if (size > DOWNLOAD_MAX_BYTES) {
            reject(new Error(`files over ${DOWNLOAD_MAX_BYTES / 1024 / 1024} MiB: use the API`));
          }
          parts.push(m.data as ArrayBuffer);
          return;
        }
        const msg = JSON.parse(m.data) as CpMessage;
        if (msg.type === "header" && msg.is_dir) {
          reject(new Error(`${path} is a directory; download one file`));
        } else if (msg.type === "error") {
          reject(new Error(msg.message ?? "the copy failed"));
        } else if (msg.type === "end" && msg.final !== false) {
          resolve(new Blob(parts));
        }
      };
      ws.onclose = (e) => reject(new Error(e.reason || "the copy's connection closed"));
    });
  } finally {
    ws.close(1000);
  }
}

export function Files(props: { instance: string }) {
  const [file, setFile] = useState<File | null>(null);
  const [dir, setDir] = useState("/tmp");
  const [path, setPath] = useState("");
  const [done, setDone] = useState("");
  const up = useAction();
  const down = useAction();
  return (
    <div class="files">
      <form
        class="inline"
        onSubmit={async (e) => {
          e.preventDefault();
          if (!file) return;
          setDone("");
          await up.run(async () => {
            const n = await upload(props.instance, file, dir);
            setDone(`Uploaded ${file.name} (${n} bytes) to ${dir}`);
          });
        }}
      >
        <label>
          File <input type="file" onChange={(e) => setFile(e.currentTarget.files?.[0] ?? null)} />
        </label>
        <label>
          Into directory <input value={dir} onInput={(e) => setDir(e.currentTarget.value)} />
        </label>
        <button type="submit" disabled={!file || up.busy}>
          Upload
        </button>
      </form>
      <ErrorNote error={up.error} />
      <form
        class="inline"
        onSubmit={async (e) => {
          e.preventDefault();
          setDone("");
          await down.run(async () => {
            const blob = await download(props.instance, path);
            const a = document.createElement("a");
            a.href = URL.createObjectURL(blob);
            a.download = path.split("/").pop() || "download";
            a.click();
            setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
            setDone(`Downloaded ${path} (${blob.size} bytes)`);
          });
        }}
      >
        <label>
          Guest file{" "}
          <input
            value={path}
            placeholder="/etc/hostname"
            required
            onInput={(e) => setPath(e.currentTarget.value)}
          />
        </label>
        <button type="submit" disabled={!path || down.busy}>
          Download
        </button>
      </form>
      <ErrorNote error={down.error} />
      {done && <p role="status">{done}</p>}
    </div>
  );
}
