// A network probe that tests run inside a namespace (`nsenter --net=… node net-probe.mjs …`),
// printing one JSON line with what it saw:
//   get URL                      → {status, body}
//   send HOST PORT BYTES         → sends BYTES, half-closes, waits for the peer's reply to end:
//                                  {bytes, ms (first write → reply's end), reply}
//   recv HOST PORT [REQUEST]     → sends REQUEST (if any), counts bytes until the peer closes:
//                                  {bytes, ms (first byte → end)}
//   serve PORT                   → HTTP server answering "remote=<address>"; prints
//                                  {listening: PORT}, then one {remote} line per request
//   connect HOST PORT            → tries a TCP connection; {connected: true} or {error}
//   wait HOST PORT               → tries every 2 ms (each try bounded at 1 s) until a connection
//                                  brings data: {answered: true, tries}
//   waiter                       → the same for each "HOST PORT" line read from stdin, one at a
//                                  time: {answered: HOST, tries} per line (a process started once,
//                                  so that its start-up is not part of what is timed)
import http from "node:http";
import net from "node:net";

const [cmd, ...args] = process.argv.slice(2);
const out = (v) => process.stdout.write(`${JSON.stringify(v)}\n`);

if (cmd === "get") {
  const res = await fetch(args[0], { signal: AbortSignal.timeout(20_000) });
  out({ status: res.status, body: await res.text() });
} else if (cmd === "send") {
  const total = Number(args[2]);
  const sock = net.connect({ host: args[0], port: Number(args[1]) });
  await new Promise((resolve, reject) => sock.once("connect", resolve).once("error", reject));
  const chunk = Buffer.alloc(64 * 1024);
  const started = performance.now();
  let reply = "";
  sock.on("data", (d) => {
    reply += d;
  });
  const ended = new Promise((resolve, reject) => sock.once("end", resolve).once("error", reject));
  for (let sent = 0; sent < total; sent += chunk.length) {
    const part = sent + chunk.length <= total ? chunk : chunk.subarray(0, total - sent);
    if (!sock.write(part)) await new Promise((r) => sock.once("drain", r));
  }
  sock.end();
  await ended;
  out({ bytes: total, ms: performance.now() - started, reply: reply.trim() });
  sock.destroy();
} else if (cmd === "recv") {
  const sock = net.connect({ host: args[0], port: Number(args[1]) });
  if (args[2] !== undefined) sock.write(`${args[2]}\n`);
  let bytes = 0;
  let first;
  sock.on("data", (d) => {
    first ??= performance.now();
    bytes += d.length;
  });
  await new Promise((resolve, reject) => sock.once("end", resolve).once("error", reject));
  out({ bytes, ms: first === undefined ? 0 : performance.now() - first });
  sock.destroy();
} else if (cmd === "serve") {
  const server = http.createServer((req, res) => {
    out({ remote: req.socket.remoteAddress });
    res.end(`remote=${req.socket.remoteAddress}\n`);
  });
  server.listen(Number(args[0]), "0.0.0.0", () => out({ listening: Number(args[0]) }));
} else if (cmd === "connect") {
  const sock = net.connect({ host: args[0], port: Number(args[1]) });
  sock.once("connect", () => {
    out({ connected: true });
    sock.destroy();
  });
  sock.once("error", (e) => out({ error: e.code ?? e.message }));
} else if (cmd === "wait" || cmd === "waiter") {
  const attempt = (host, port) =>
    new Promise((resolve) => {
      const sock = net.connect({ host, port: Number(port) });
      const done = (ok) => {
        clearTimeout(timer);
        sock.destroy();
        resolve(ok);
      };
      const timer = setTimeout(() => done(false), 1000);
      sock.once("data", () => done(true));
      sock.once("error", () => done(false));
      sock.once("end", () => done(false));
    });
  const waitFor = async (host, port) => {
    let tries = 1;
    while (!(await attempt(host, port))) {
      tries++;
      await new Promise((r) => setTimeout(r, 2));
    }
    return tries;
  };
  if (cmd === "wait") {
    out({ answered: true, tries: await waitFor(args[0], args[1]) });
  } else {
    const { createInterface } = await import("node:readline");
    for await (const line of createInterface({ input: process.stdin })) {
      const [host, port] = line.trim().split(/\s+/);
      out({ answered: host, tries: await waitFor(host, port) });
    }
  }
} else {
  process.stderr.write(`net-probe: unknown command ${cmd}\n`);
  process.exit(2);
}
