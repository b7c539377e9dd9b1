// The protocol between the host agent and a QEMU guest's /init, defined once.
//
// Guest side: `init` beside this file, a busybox sh script that scripts/vm-assets.ts packs into
// the initramfs as /init. It loads the virtio modules, finds its disks by their virtio serial
// numbers (GUEST_DISKS), sources the config disk (GUEST_CONFIG), mounts the image's rootfs under
// an overlay, runs the program there under chroot and stays PID 1 to report its exit. It prints
// its lifecycle on the serial console (INIT_MARKER lines). `ctl.c` beside it, compiled into the
// initramfs as /bin/offshoot-ctl, answers the control channel (CONTROL_PORT) one line per command
// and brings the network up at boot. Without disks (launch tests, the KVM probe) /init runs the
// kernel command line's CMDLINE_COMMAND, or else a counter (COUNT_MARKER lines).
//
// Host side (host-agent/src/drivers/qemu/): the driver attaches the disks and writes the config
// disk, launch.ts starts QEMU with the control port and the kernel command line, serial.ts reads
// the markers from the serial log, control.ts sends commands over the port's unix socket.
//
// protocol.test.ts holds the init and ctl.c to this file: a marker, event, field, verb, reply,
// disk or config name changed on one side alone fails it.

/** Prefix of /init's lifecycle lines on the serial console: `OFFSHOOT-INIT <InitEvent as JSON>`. */
export const INIT_MARKER = "OFFSHOOT-INIT";

/** Prefix of a counter's lines, `OFFSHOOT-COUNT n` once a second: /init's own program when it
 * is given none, and the test image's (scripts/oci-image.ts). */
export const COUNT_MARKER = "OFFSHOOT-COUNT";

/**
 * What /init reports: `ready` before the program starts; `exit` after it ends (`oom` when the
 * kernel's OOM killer ended it), then the guest powers off; `failed` when the guest cannot start
 * its program at all (no disk, an unmountable rootfs), then it powers off; `insmod_failed` for a
 * module that did not load (the boot goes on).
 */
export type InitEvent =
  | { event: "ready" }
  | { event: "exit"; code: number; oom?: boolean }
  | { event: "failed"; message: string }
  | { event: "insmod_failed"; module: string };

/** Each event's fields besides `event`, as /init prints them. */
export const INIT_EVENT_FIELDS: {
  readonly [E in InitEvent["event"]]: ReadonlyArray<
    Exclude<keyof Extract<InitEvent, { event: E }>, "event">
  >;
} = {
  ready: [],
  exit: ["code", "oom"],
  failed: ["message"],
  insmod_failed: ["module"],
};

/** The virtio serial numbers of a guest's disks, by which /init finds them (any probe order). */
export const GUEST_DISKS = {
  /** The image's rootfs (ext4, read-only): the overlay's lower dir. */
  root: "offshoot-root",
  /** The instance's own disk (ext4): the overlay's upper and work dirs. */
  rw: "offshoot-rw",
  /** The config disk: a shell fragment /init sources, defining GUEST_CONFIG. */
  cfg: "offshoot-cfg",
} as const;

/** A volume's disk is `offshoot-vol<n>`, n its place in the instance's volume list. */
export const VOLUME_DISK_PREFIX = "offshoot-vol";

/**
 * What the config disk defines, every value single-quoted. Besides these, the fragment ends with
 * `set -- ARGV…`: the program and its arguments (argv[0] is looked up in the PATH its
 * environment sets, not busybox's).
 */
export const GUEST_CONFIG = {
  /** Variable: the guest's hostname. */
  hostname: "OFFSHOOT_HOSTNAME",
  /** Variable: the program's working dir (made if missing). */
  workdir: "OFFSHOOT_WORKDIR",
  /** Variable: the image's User (`offshoot-ctl as` runs the program as it); empty: root. */
  user: "OFFSHOOT_USER",
  /** Variable: eth0's IPv4 address with its prefix length, e.g. `10.64.0.5/20`; empty: no
   * network (eth0 stays down). */
  address: "OFFSHOOT_ADDRESS",
  /** Variable: the default gateway, e.g. `10.64.0.1`; empty: no default route. */
  gateway: "OFFSHOOT_GATEWAY",
  /** Variable: the machine id (32 lowercase hex digits), written into the image's
   * /etc/machine-id when it has one. */
  machineId: "OFFSHOOT_MACHINE_ID",
  /** Variable: `1` starts the guest agent (/bin/offshoot-agent, agent-protocol.ts) before the
   * program; empty: the instance was created with skip_guest_agent. */
  agent: "OFFSHOOT_GUEST_AGENT",
  /** Shell function: exports the program's environment. */
  env: "offshoot_env",
  /** Shell function: calls `volume` for each volume; /init runs it after the root is mounted. */
  volumes: "offshoot_volumes",
  /** Shell function /init defines, called `offshoot_volume N MODE PATH`: mounts the disk
   * `offshoot-vol<N>` at PATH, MODE rw, ro or overlay. */
  volume: "offshoot_volume",
} as const;

/** Kernel command line parameter of a guest without disks: `offshoot.cmd=BASE64`, a shell
 * command /init runs with `sh -c` (base64 keeps it one token). `MODULE.PARAM=VALUE` parameters
 * on the command line are passed to that module's insmod by /init: busybox insmod ignores them. */
export const CMDLINE_COMMAND = "offshoot.cmd";

/*
 * The control channel: a virtio-serial port, one command line in, one reply line out.
 *   ping                      → pong
 *   mac 02:aa:bb:cc:dd:ee     → ok mac <eth0's address now> | err mac <reason>
 *   query mac                 → ok mac <eth0's address>     | err query mac
 *   query net                 → ok net <eth0's MAC|-> <its ADDR/PREFIX|-> <default gateway|->
 *   query rng                 → ok rng <RNG_BYTES from getrandom(2), hex>
 *                               | err query rng <reason> (`not ready`: the CRNG is not seeded yet)
 *   identity NAME MAC|- ADDR|- GW|- MACHINEID SEED
 *                             → ok identity <hostname> <eth0's MAC|-> <its ADDR/PREFIX|->
 *                               | err identity <the step that failed and why>
 *   stop                      → ok stop (SIGTERM sent to the program) | err stop <reason>
 *   anything else             → err <verb> unknown command
 * `identity` makes a fork its own machine, everything applied before the reply: the hostname;
 * the kernel RNG fed SEED (32 bytes from the host, hex) credited in full, then reseeded; the
 * image's /etc/machine-id (if it has one) replaced by MACHINEID; and, unless MAC is NONE (no
 * NIC), eth0 given MAC, its IPv4 addresses replaced by ADDR (NONE: none), brought up, the
 * default route replaced by one via GW (NONE: removed), its neighbour entries flushed and a
 * gratuitous ARP sent for ADDR. Every argument is checked before anything changes. A line longer
 * than CONTROL_MAX_LINE bytes is refused (`err <its first word> …`) and the guest goes on.
 * The guest sleeps until the host connects or writes (SIGIO from virtio_console, with a 1 s
 * fallback), so an answer costs the command itself, not a poll interval.
 */

/** The port's name; offshoot-ctl looks for it under /sys/class/virtio-ports. */
export const CONTROL_PORT = "offshoot.ctl";

/** The longest command line the guest takes, without its newline. */
export const CONTROL_MAX_LINE = 512;

/** The first words of the commands the guest answers. */
export const CONTROL_VERBS = ["ping", "mac", "query", "identity", "stop"] as const;
export type ControlVerb = (typeof CONTROL_VERBS)[number];

/** How many bytes `query rng` draws. */
export const RNG_BYTES = 32;

/** A missing MAC (no NIC), address or gateway, in commands and replies. */
export const NONE = "-";

/** What `identity` sets; null: NONE. */
export interface IdentityArgs {
  hostname: string;
  mac: string | null;
  /** `10.64.0.5/20` */
  address: string | null;
  /** `10.64.0.1` */
  gateway: string | null;
  /** 32 lowercase hex digits. */
  machineId: string;
}

/** eth0 as the guest reports it (`ok net`); null: NONE. */
export interface GuestNet {
  mac: string | null;
  address: string | null;
  gateway: string | null;
}

const orNone = (v: string | null) => v ?? NONE;
const orNull = (v: string) => (v === NONE ? null : v);

/** Command lines, without the newline. */
export const controlCommand = {
  ping: "ping",
  /** Set eth0's MAC. */
  mac: (mac: string) => `mac ${mac}`,
  queryMac: "query mac",
  queryNet: "query net",
  /** Draw RNG_BYTES from the guest kernel's CRNG: what tells two guests' RNGs apart. */
  queryRng: "query rng",
  /** Make the guest `id` and reseed its RNG with `seedHex` (32 bytes, 64 hex digits). */
  identity: (id: IdentityArgs, seedHex: string) =>
    `identity ${id.hostname} ${orNone(id.mac)} ${orNone(id.address)} ${orNone(id.gateway)} ` +
    `${id.machineId} ${seedHex}`,
  /** SIGTERM the program; the guest powers off once it exits. */
  stop: "stop",
} as const;

/** The success replies. */
export const controlReply = {
  pong: "pong",
  /** To `mac` and `query mac`: eth0's address. */
  mac: (mac: string) => `ok mac ${mac}`,
  /** To `query net`. */
  net: (net: GuestNet) => `ok net ${orNone(net.mac)} ${orNone(net.address)} ${orNone(net.gateway)}`,
  /** To `query rng`: the bytes drawn, in lowercase hex. */
  rng: (hex: string) => `ok rng ${hex}`,
  identity: (hostname: string, mac: string | null, address: string | null) =>
    `ok identity ${hostname} ${orNone(mac)} ${orNone(address)}`,
  stop: "ok stop",
} as const;

/** How each verb's success replies start (`query`'s: `ok ` and what it asked for). */
const OK_REPLIES: { readonly [V in ControlVerb]: (args: string) => (line: string) => boolean } = {
  ping: () => (line) => line === controlReply.pong,
  mac: () => (line) => line.startsWith("ok mac "),
  query: (what) => (line) => line.startsWith(`ok ${what} `),
  identity: () => (line) => line.startsWith("ok identity "),
  stop: () => (line) => line === controlReply.stop,
};

/** Whether `line` is the reply to `command` (a command line); anything else is a stale line
 * left by an earlier command. */
export function answers(command: string, line: string): boolean {
  const [verb = "", what = ""] = command.split(" ");
  if (line === `err ${verb}` || line.startsWith(`err ${verb} `)) return true;
  const ok = Object.hasOwn(OK_REPLIES, verb) ? OK_REPLIES[verb as ControlVerb] : undefined;
  return ok ? ok(what)(line) : false;
}

/** The address in an `ok mac` reply; undefined for any other line. */
export function macOfReply(line: string): string | undefined {
  return /^ok mac (\S+)$/.exec(line)?.[1];
}

/** eth0's MAC, address and gateway in an `ok net` reply; undefined for any other line. */
export function netOfReply(line: string): GuestNet | undefined {
  const m = /^ok net (\S+) (\S+) (\S+)$/.exec(line);
  if (!m) return undefined;
  return {
    mac: orNull(m[1] ?? NONE),
    address: orNull(m[2] ?? NONE),
    gateway: orNull(m[3] ?? NONE),
  };
}

/** The bytes drawn, in hex, in an `ok rng` reply; undefined for any other line. */
export function rngOfReply(line: string): string | undefined {
  return new RegExp(`^ok rng ([0-9a-f]{${2 * RNG_BYTES}})$`).exec(line)?.[1];
}
