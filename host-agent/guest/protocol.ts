// The protocol between the host agent and a QEMU guest's /init, defined once.
//
// Guest side: `init` beside this file, a busybox sh script that scripts/vm-assets.ts packs into
// the initramfs as /init. It loads the virtio modules, finds its disks by their virtio serial
// numbers (GUEST_DISKS), sources the config disk (GUEST_CONFIG), mounts the image's rootfs under
// an overlay, runs the program there under chroot and stays PID 1 to report its exit. It prints
// its lifecycle on the serial console (INIT_MARKER lines) and answers the control channel
// (CONTROL_PORT) one line per command. Without disks (launch tests, the KVM probe) it runs the
// kernel command line's CMDLINE_COMMAND, or else a counter (COUNT_MARKER lines).
//
// Host side (host-agent/src/drivers/qemu/): the driver attaches the disks and writes the config
// disk, launch.ts starts QEMU with the control port and the kernel command line, serial.ts reads
// the markers from the serial log, control.ts sends commands over the port's unix socket.
//
// protocol.test.ts holds the init to this file: a marker, event, field, verb, reply, disk or
// config name changed on one side alone fails it.

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
  /** Shell function: exports the program's environment. */
  env: "offshoot_env",
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
 *   identity NAME MAC|-       → ok identity <hostname> <eth0's address|->  | err identity …
 *   stop                      → ok stop (SIGTERM sent to the program) | err stop <reason>
 *   anything else             → err <verb> unknown command
 * The guest polls the port every 0.1 s (a read returns EOF while no host is connected), so an
 * answer takes up to one poll interval plus the command itself.
 */

/** The port's name; /init looks for it under /sys/class/virtio-ports. */
export const CONTROL_PORT = "offshoot.ctl";

/** The first words of the commands /init answers. */
export const CONTROL_VERBS = ["ping", "mac", "query", "identity", "stop"] as const;
export type ControlVerb = (typeof CONTROL_VERBS)[number];

/** `identity`'s MAC for a guest without a NIC. */
export const NO_MAC = "-";

/** Command lines, without the newline. */
export const controlCommand = {
  ping: "ping",
  /** Set eth0's MAC. */
  mac: (mac: string) => `mac ${mac}`,
  queryMac: "query mac",
  /** Set the hostname and eth0's MAC (NO_MAC: leave the NICs alone) in one round trip. */
  identity: (hostname: string, mac: string) => `identity ${hostname} ${mac}`,
  /** SIGTERM the program; the guest powers off once it exits. */
  stop: "stop",
} as const;

/** The success replies. */
export const controlReply = {
  pong: "pong",
  /** To `mac` and `query mac`: eth0's address. */
  mac: (mac: string) => `ok mac ${mac}`,
  identity: (hostname: string, mac: string) => `ok identity ${hostname} ${mac}`,
  stop: "ok stop",
} as const;

/** Whether `line` is the reply to a command starting with `verb`; anything else is a stale line
 * left by an earlier command. */
export function answers(verb: string, line: string): boolean {
  return verb === "ping"
    ? line === controlReply.pong
    : line.startsWith("ok ") || line.startsWith(`err ${verb}`);
}

/** The address in an `ok mac` reply; undefined for any other line. */
export function macOfReply(line: string): string | undefined {
  return /^ok mac (\S+)$/.exec(line)?.[1];
}
