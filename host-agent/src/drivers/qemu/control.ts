// The guest control channel, host side: the virtio-serial port /init answers on (launch.ts adds
// it to every guest), reached through the unix socket QEMU listens on. Its commands and replies
// are host-agent/guest/protocol.ts.
import net from "node:net";
import {
  answers,
  controlCommand,
  controlReply,
  macOfReply,
  netOfReply,
  rngOfReply,
} from "../../../guest/protocol.ts";
import { checkSocketPath } from "./qmp.ts";

export interface ControlOptions {
  timeoutMs?: number;
}

const DEFAULT_TIMEOUT_MS = 5_000;

/** Sends one command line and resolves with the guest's reply line (without the newline).
 * `shown`: the command as errors name it (one carrying a secret names less). */
export function guestControl(
  socketPath: string,
  command: string,
  opts: ControlOptions = {},
  shown: string = command,
): Promise<string> {
  if (command.includes("\n")) throw new Error("a control command is one line");
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
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
            `guest control ${socketPath}: no reply to "${shown}" within ${timeoutMs} ms` +
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
        if (answers(command, line)) return done(undefined, line);
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

export interface GuestIdentity {
  hostname: string;
  /** eth0's MAC; null: the guest has no NIC (network steps skipped). */
  mac: string | null;
  /** "10.64.0.5/20"; null: no address. */
  address: string | null;
  /** "10.64.0.1"; null: no default route. */
  gateway: string | null;
  /** 32 lowercase hex chars. */
  machineId: string;
}

/** What the guest's RNG is fed by setGuestIdentity. */
const SEED_BYTES = 32;

/** Applies the identity and reseeds the guest RNG with `seed` (32 bytes) in one round trip;
 * rejects unless the guest reports exactly that hostname, MAC and address. */
export async function setGuestIdentity(
  socketPath: string,
  identity: GuestIdentity,
  seed: Buffer,
  opts: ControlOptions = {},
): Promise<void> {
  if (seed.length !== SEED_BYTES) {
    throw new Error(`a guest RNG seed is ${SEED_BYTES} bytes, not ${seed.length}`);
  }
  const want = { ...identity, mac: identity.mac?.toLowerCase() ?? null };
  const command = controlCommand.identity(want, seed.toString("hex"));
  // The seed stays out of error messages.
  const reply = await guestControl(socketPath, command, opts, `identity ${want.hostname} …`);
  if (reply !== controlReply.identity(want.hostname, want.mac, want.address)) {
    const asked = controlReply.identity(want.hostname, want.mac, want.address).slice(3);
    throw new Error(`guest did not take ${asked}: ${reply}`);
  }
}

/** eth0's MAC, address and gateway as the guest sees them. */
export async function guestNet(
  socketPath: string,
  opts: ControlOptions = {},
): Promise<{ mac: string | null; address: string | null; gateway: string | null }> {
  const reply = await guestControl(socketPath, controlCommand.queryNet, opts);
  const net = netOfReply(reply);
  if (!net) throw new Error(`guest cannot tell its network: ${reply}`);
  return net;
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

/** RNG_BYTES (32) drawn from the guest kernel's CRNG (getrandom, never blocking); rejects when
 * the guest cannot draw them (its CRNG not seeded yet). Two guests that return the same bytes
 * share their RNG's state: forks of one snapshot before their identity reseeds them. */
export async function guestRandom(socketPath: string, opts: ControlOptions = {}): Promise<Buffer> {
  const reply = await guestControl(socketPath, controlCommand.queryRng, opts);
  const hex = rngOfReply(reply);
  if (hex === undefined) throw new Error(`guest cannot draw random bytes: ${reply}`);
  return Buffer.from(hex, "hex");
}
