// The guest control channel, host side: the virtio-serial port /init answers on (launch.ts adds
// it to every guest), reached through the unix socket QEMU listens on. Its commands and replies
// are host-agent/guest/protocol.ts.
import net from "node:net";
import {
  answers,
  controlCommand,
  controlReply,
  macOfReply,
  NO_MAC,
} from "../../../guest/protocol.ts";
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
        if (answers(verb, line)) return done(undefined, line);
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
  const reply = await guestControl(socketPath, controlCommand.mac(mac), opts);
  if (reply !== controlReply.mac(mac.toLowerCase())) {
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
  const want = mac?.toLowerCase() ?? NO_MAC;
  const reply = await guestControl(socketPath, controlCommand.identity(hostname, want), opts);
  if (reply !== controlReply.identity(hostname, want)) {
    throw new Error(`guest did not take ${hostname} ${want}: ${reply}`);
  }
}

/** Asks the guest's init to SIGTERM its program (the guest powers off once it exits). False
 * when the guest cannot (no program, or a guest without an image). */
export async function askGuestToStop(socketPath: string, opts: ControlOptions = {}) {
  return (await guestControl(socketPath, controlCommand.stop, opts)) === controlReply.stop;
}

/** eth0's MAC as the guest sees it. */
export async function guestMac(socketPath: string, opts: ControlOptions = {}): Promise<string> {
  const reply = await guestControl(socketPath, controlCommand.queryMac, opts);
  const mac = macOfReply(reply);
  if (!mac) throw new Error(`guest cannot tell its MAC: ${reply}`);
  return mac;
}
