// The guest control channel, host side: a virtio-serial port named `offshoot.ctl` (launch.ts),
// reached through the unix socket QEMU listens on. /init (scripts/vm-assets.ts) answers one line
// per command:
//   ping                      → pong
//   mac 02:aa:bb:cc:dd:ee     → ok mac <eth0's address now> | err mac <reason>
//   query mac                 → ok mac <eth0's address>     | err query mac
//   identity NAME MAC|-       → ok identity <hostname> <eth0's address|->  | err identity …
//   stop                      → ok stop (SIGTERM sent to the program) | err stop <reason>
//   anything else             → err <verb> unknown command
// The guest polls the port (a read returns EOF while no host is connected), so an answer takes
// one poll interval (≤ 0.1 s) plus the command itself.
import net from "node:net";
import { checkSocketPath } from "./qmp.ts";

export interface ControlOptions {
  timeoutMs?: number;
}

const DEFAULT_TIMEOUT_MS = 5_000;

/** Sends one command line and resolves with the guest's reply line (without the newline). */
export function guestControl(
  socketPath: string,
  command: string,
  opts: ControlOptions = {},
): Promise<string> {
  if (command.includes("\n")) throw new Error("a control command is one line");
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const verb = command.split(" ")[0] ?? "";
  // A reply that belongs to this command; anything else is a stale line from an earlier one.
  const answers = (line: string) =>
    verb === "ping" ? line === "pong" : line.startsWith("ok ") || line.startsWith(`err ${verb}`);
  return new Promise((resolve, reject) => {
    const sock = net.connect(checkSocketPath(socketPath));
    let buf = "";
    const done = (err: Error | undefined, line?: string) => {
      clearTimeout(timer);
      sock.destroy();
      if (err) reject(err);
      else resolve(line ?? "");
    };
    const timer = setTimeout(
      () =>
        done(
          new Error(
            `guest control ${socketPath}: no reply to "${command}" within ${timeoutMs} ms` +
              (buf ? ` (partial: ${JSON.stringify(buf)})` : ""),
          ),
        ),
      timeoutMs,
    );
    sock.setEncoding("utf8");
    sock.on("connect", () => sock.write(`${command}\n`));
    sock.on("data", (chunk: string) => {
      buf += chunk;
      for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (answers(line)) return done(undefined, line);
      }
    });
    sock.on("error", (e) => done(new Error(`guest control ${socketPath}: ${e.message}`)));
    sock.on("close", () => done(new Error(`guest control ${socketPath}: closed before a reply`)));
  });
}

/** Sets eth0's MAC inside the guest; rejects unless the guest reports exactly that address. */
export async function setGuestMac(
  socketPath: string,
  mac: string,
  opts: ControlOptions = {},
): Promise<void> {
  const reply = await guestControl(socketPath, `mac ${mac}`, opts);
  if (reply !== `ok mac ${mac.toLowerCase()}`) {
    throw new Error(`guest did not take MAC ${mac}: ${reply}`);
  }
}

/** Sets hostname and (unless null: no NIC) eth0's MAC in one round trip; rejects unless the
 * guest reports exactly those. */
export async function setGuestIdentity(
  socketPath: string,
  hostname: string,
  mac: string | null,
  opts: ControlOptions = {},
): Promise<void> {
  const want = `${hostname} ${mac?.toLowerCase() ?? "-"}`;
  const reply = await guestControl(socketPath, `identity ${want}`, opts);
  if (reply !== `ok identity ${want}`) throw new Error(`guest did not take ${want}: ${reply}`);
}

/** Asks the guest's init to SIGTERM its program (the guest powers off once it exits). False
 * when the guest cannot (no program, or a guest without an image). */
export async function askGuestToStop(socketPath: string, opts: ControlOptions = {}) {
  return (await guestControl(socketPath, "stop", opts)) === "ok stop";
}

/** eth0's MAC as the guest sees it. */
export async function guestMac(socketPath: string, opts: ControlOptions = {}): Promise<string> {
  const reply = await guestControl(socketPath, "query mac", opts);
  const m = /^ok mac (\S+)$/.exec(reply);
  if (!m?.[1]) throw new Error(`guest cannot tell its MAC: ${reply}`);
  return m[1];
}
