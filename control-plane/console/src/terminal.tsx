// A terminal into the guest: Hypeman's exec protocol over a WebSocket (opened with a stream
// token) with a TTY, drawn by xterm.js. Keys go as binary stdin frames, a resize as
// {"resize":{rows,cols}}, and the command's exit code arrives as {"exitCode":N}. xterm.js is
// loaded when a terminal is first opened (a chunk of its own), not with every page.
import { useEffect, useRef, useState } from "preact/hooks";
import { guestSocket } from "./api.ts";
import { messageOf } from "./ui.tsx";

export function Terminal(props: { instance: string }) {
  const [command, setCommand] = useState("/bin/sh");
  const [session, setSession] = useState(0);
  const [status, setStatus] = useState("");
  return (
    <div class="terminal">
      <form
        class="inline"
        onSubmit={(e) => {
          e.preventDefault();
          setSession((n) => n + 1);
        }}
      >
        <label>
          Command <input value={command} onInput={(e) => setCommand(e.currentTarget.value)} />
        </label>
        <button type="submit">{session ? "Restart terminal" : "Open terminal"}</button>
        <span class="hint" role="status">
          {status}
        </span>
      </form>
      {session > 0 && (
        <Session
          key={session}
          instance={props.instance}
          command={command.trim().split(/\s+/)}
          onStatus={setStatus}
        />
      )}
    </div>
  );
}

function Session(props: { instance: string; command: string[]; onStatus: (s: string) => void }) {
  const el = useRef<HTMLDivElement>(null);
  useEffect(() => {
    const host = el.current;
    if (!host) return;
    let closed = false;
    let teardown = () => {};
    props.onStatus("Connecting…");
    loadXterm().then(
      ({ Xterm, FitAddon }) => {
        if (!closed) teardown = run(host, Xterm, FitAddon);
      },
      (e) => props.onStatus(`Cannot load the terminal: ${messageOf(e)}`),
    );
    return () => {
      closed = true;
      teardown();
    };
  }, []);
  return <div class="xterm-host" ref={el} data-testid="terminal" />;

  function run(host: HTMLElement, Xterm: XtermModule["Xterm"], FitAddon: XtermModule["FitAddon"]) {
    const term = new Xterm({ convertEol: false, cursorBlink: true, fontSize: 14 });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(host);
    fit.fit();
    let ws: WebSocket | undefined;
    let closed = false;
    const encoder = new TextEncoder();
    guestSocket(props.instance, "exec").then(
      (socket) => {
        if (closed) return socket.close();
        ws = socket;
        socket.onopen = () => {
          socket.send(
            JSON.stringify({ command: props.command, tty: true, rows: term.rows, cols: term.cols }),
          );
          props.onStatus("Connected");
          term.focus();
        };
        socket.onmessage = (m) => {
          if (typeof m.data === "string") {
            const msg = JSON.parse(m.data) as { exitCode?: number };
            if (msg.exitCode !== undefined) props.onStatus(`Exited with code ${msg.exitCode}`);
          } else {
            term.write(new Uint8Array(m.data as ArrayBuffer));
          }
        };
        socket.onclose = (e) => {
          if (!closed && e.code !== 1000) props.onStatus(`Closed: ${e.reason || `code ${e.code}`}`);
        };
      },
      (e) => props.onStatus(`Cannot open a terminal: ${messageOf(e)}`),
    );
    const input = term.onData((d) => {
      if (ws?.readyState === WebSocket.OPEN) ws.send(encoder.encode(d));
    });
    const resized = term.onResize(({ rows, cols }) => {
      if (ws?.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ resize: { rows, cols } }));
    });
    const observer = new ResizeObserver(() => fit.fit());
    observer.observe(host);
    return () => {
      closed = true;
      observer.disconnect();
      input.dispose();
      resized.dispose();
      ws?.close(1000);
      term.dispose();
    };
  }
}

type XtermModule = Awaited<ReturnType<typeof loadXterm>>;

async function loadXterm() {
  const [{ Terminal: Xterm }, { FitAddon }] = await Promise.all([
    import("@xterm/xterm"),
    import("@xterm/addon-fit"),
    import("@xterm/xterm/css/xterm.css"),
  ]);
  return { Xterm, FitAddon };
}
