// The init script, ctl.c and protocol.ts, held to each other: each name one side uses must be
// the other's. The init and ctl.c are read as text; their behaviour is tested with real guests
// (ctl.test.ts, launch.test.ts, qemu-driver.test.ts).
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { guestConfig } from "../src/drivers/qemu/guest-config.ts";
import { guestDevices, kernelCmdline } from "../src/drivers/qemu/launch.ts";
import { spec } from "../testing/index.ts";
import {
  AGENT_PORT,
  EXIT_FIELDS,
  GUEST,
  HEADER_BYTES,
  HELLO_TEXT,
  HOST,
  IN_WINDOW,
  MAX_PAYLOAD,
  MAX_SESSIONS,
  OPEN_FIELDS,
  OUT_WINDOW,
  STAT_FIELDS,
  TIMEOUT_EXIT_CODE,
} from "./agent-protocol.ts";
import {
  answers,
  CMDLINE_COMMAND,
  CONTROL_MAX_LINE,
  CONTROL_PORT,
  CONTROL_VERBS,
  COUNT_MARKER,
  controlCommand,
  controlReply,
  GUEST_CONFIG,
  GUEST_DISKS,
  INIT_EVENT_FIELDS,
  INIT_MARKER,
  NONE,
  netOfReply,
  RNG_BYTES,
  rngOfReply,
  VOLUME_DISK_PREFIX,
} from "./protocol.ts";

const init = readFileSync(new URL("./init", import.meta.url), "utf8");
const ctl = readFileSync(new URL("./ctl.c", import.meta.url), "utf8");

const all = (re: RegExp, text = init) => [...text.matchAll(re)].map((m) => m[1] ?? "");
const sorted = (xs: Iterable<string>) => [...new Set(xs)].sort();

/** The body of a C function `name` in `source` (ctl.c by default), up to its closing brace at
 * column 0. */
function cFunction(name: string, source = ctl): string {
  const start = source.search(new RegExp(`^(static )?\\w+ \\*?${name}\\(`, "m"));
  expect(start, `${name}()`).toBeGreaterThanOrEqual(0);
  return source.slice(start, source.indexOf("\n}\n", start));
}

describe("the guest init and protocol.ts", () => {
  it("is a sh script", () => {
    expect(init.startsWith("#!/bin/sh\n")).toBe(true);
  });

  it("prints the markers protocol.ts names", () => {
    expect(init).toContain(`marker() { echo "${INIT_MARKER} $1"; }`);
    expect(init).toContain(`echo "${COUNT_MARKER} $n"`);
    // The test image counts the same way (scripts/oci-image.ts).
    const testImage = readFileSync(new URL("../../scripts/oci-image.ts", import.meta.url), "utf8");
    expect(testImage).toContain(`echo "${COUNT_MARKER} $n"`);
  });

  it("reports exactly the events protocol.ts names, with their fields", () => {
    // JSON inside shell quotes: `"event":"ready"` or `\"event\":\"exit\"`.
    const markers = init.split("\n").filter((l) => /\bmarker ["']/.test(l));
    expect(markers.length).toBeGreaterThan(0);
    const printed = markers.flatMap((l) => all(/\\?"event\\?":\\?"(\w+)\\?"/g, l));
    expect(sorted(printed)).toEqual(sorted(Object.keys(INIT_EVENT_FIELDS)));
    for (const line of markers) {
      const [event] = all(/\\?"event\\?":\\?"(\w+)\\?"/g, line);
      const fields = INIT_EVENT_FIELDS[event as keyof typeof INIT_EVENT_FIELDS];
      expect(fields, line).toBeDefined();
      for (const key of all(/\\?"(\w+)\\?":/g, line))
        expect(["event", ...fields], line).toContain(key);
    }
    // Every field is printed somewhere (`oom` is spliced into the exit marker from a variable).
    const keys = all(/\\?"(\w+)\\?":/g);
    expect(sorted(keys)).toEqual(sorted(["event", ...Object.values(INIT_EVENT_FIELDS).flat()]));
  });

  it("finds the disks by the serials protocol.ts names", () => {
    expect(sorted(all(/\bdisk (offshoot-[\w-]+)/g))).toEqual(
      sorted([...Object.values(GUEST_DISKS), VOLUME_DISK_PREFIX]),
    );
  });

  it("reads exactly the config names protocol.ts exports", () => {
    const read = all(/\b(OFFSHOOT_[A-Z_]+|offshoot_[a-z_]+)\b/g);
    expect(sorted(read)).toEqual(sorted(Object.values(GUEST_CONFIG)));
    expect(init).toContain(". /run/offshoot/config.sh");
  });

  it("takes its command from the kernel command line parameter protocol.ts names", () => {
    expect(sorted(all(/\b(offshoot\.\w+)=/g))).toEqual([CMDLINE_COMMAND]);
  });

  it("runs offshoot-ctl for the control channel and the boot network, in place of shell", () => {
    expect(init).toMatch(/^offshoot-ctl serve <\/dev\/null &$/m);
    expect(init).toContain(
      `offshoot-ctl net "$${GUEST_CONFIG.address}" "$${GUEST_CONFIG.gateway}"`,
    );
    expect(init).not.toMatch(/ctl_\w+\(\)/);
  });
});

describe("ctl.c and protocol.ts", () => {
  it("answers on the port protocol.ts names, with its line limit", () => {
    expect(ctl).toContain(`#define PORT_NAME "${CONTROL_PORT}"`);
    expect(ctl).toContain(`#define MAX_LINE ${CONTROL_MAX_LINE}`);
    expect(ctl).toContain(`#define RNG_BYTES ${RNG_BYTES}`);
  });

  it("answers exactly the verbs protocol.ts names", () => {
    const verbs = all(/strcmp\(verb, "(\w+)"\) == 0/g, cFunction("handle"));
    expect(sorted(verbs)).toEqual(sorted(CONTROL_VERBS));
    // The queries: `query mac`, `query net` and `query rng`.
    const queries = all(/strcmp\(what, "(\w+)"\) == 0/g, cFunction("cmd_query"));
    const named = [controlCommand.queryMac, controlCommand.queryNet, controlCommand.queryRng];
    expect(sorted(queries)).toEqual(sorted(named.map((q) => q.split(" ")[1] ?? "")));
  });

  it("draws query rng's bytes with getrandom before anything else the query does", () => {
    const body = cFunction("cmd_query");
    const rng = body.indexOf("query_rng();");
    expect(rng).toBeGreaterThan(0);
    expect(rng).toBeLessThan(body.indexOf("ioctl_sock()"));
    expect(cFunction("query_rng")).toContain("getrandom(buf, sizeof buf, GRND_NONBLOCK)");
  });

  it("takes identity's arguments in protocol.ts's order, NONE for a missing one", () => {
    const line = controlCommand.identity(
      { hostname: "h", mac: null, address: null, gateway: null, machineId: "m" },
      "s",
    );
    const words = line.split(" ");
    const body = cFunction("cmd_identity");
    expect(body).toContain(`if (argc != ${words.length}) {`);
    expect(words.slice(2, 5)).toEqual([NONE, NONE, NONE]);
    // NAME MAC ADDR GW MACHINEID SEED.
    expect(body).toContain(
      "name = argv[1], *mac_arg = argv[2], *addr_arg = argv[3], *gw_arg = argv[4];",
    );
    expect(body).toContain("write_machine_id(argv[5])");
    expect(body).toContain("parse_hex(argv[6], seed");
    for (const arg of ["mac_arg", "addr_arg", "gw_arg"])
      expect(body).toContain(`strcmp(${arg}, "${NONE}") != 0`);
    expect(ctl).toContain(
      `char mac_text[18] = "${NONE}", addr_text[INET_ADDRSTRLEN + 4] = "${NONE}";`,
    );
  });

  it("prints the replies protocol.ts names", () => {
    const replies = all(/(?:say|FAIL)\("([^"]*)"/g, ctl);
    const f = "%s";
    for (const reply of [
      controlReply.pong,
      controlReply.stop,
      controlReply.mac(f),
      controlReply.identity(f, f, f),
      controlReply.net({ mac: f, address: f, gateway: f }),
      controlReply.rng(f),
    ])
      expect(replies, reply).toContain(reply);
    // Errors start `err <verb>`, so the host tells them from stale lines; the unknown or
    // overlong line's own first word is printed as its verb.
    const errors = replies.filter((r) => r.startsWith("err ")).map((r) => r.split(" ")[1]);
    expect(errors.length).toBeGreaterThan(5);
    for (const verb of errors) expect([...CONTROL_VERBS, "%.32s", "%s"]).toContain(verb);
    for (const verb of CONTROL_VERBS.filter((v) => v !== "ping"))
      expect(errors, `an err ${verb} reply`).toContain(verb);
  });

  it("tells a reply to its command from a stale line", () => {
    expect(answers("ping", "pong")).toBe(true);
    expect(answers("query net", "ok mac 02:00:00:00:00:01")).toBe(false);
    expect(answers("query net", "ok net - - -")).toBe(true);
    expect(answers("query mac", "ok mac 02:00:00:00:00:01")).toBe(true);
    expect(answers("identity a - - - x y", "ok mac 02:00:00:00:00:01")).toBe(false);
    expect(answers("identity a - - - x y", "ok identity a - -")).toBe(true);
    expect(answers("identity a - - - x y", "err identity seed invalid")).toBe(true);
    expect(answers("mac 02:00:00:00:00:01", "err machine")).toBe(false);
    expect(answers("bogus", "err bogus unknown command")).toBe(true);
    expect(answers("stop", "ok stop")).toBe(true);
    expect(netOfReply("ok net 02:00:00:00:00:01 10.64.0.5/20 -")).toEqual({
      mac: "02:00:00:00:00:01",
      address: "10.64.0.5/20",
      gateway: null,
    });
    expect(netOfReply("ok net - -")).toBeUndefined();
    const hex = "0123456789abcdef".repeat((2 * RNG_BYTES) / 16);
    expect(answers(controlCommand.queryRng, controlReply.rng(hex))).toBe(true);
    expect(answers(controlCommand.queryRng, "err query rng not ready")).toBe(true);
    expect(answers(controlCommand.queryRng, "ok net - - -")).toBe(false);
    expect(rngOfReply(controlReply.rng(hex))).toBe(hex);
    expect(rngOfReply(controlReply.rng(hex.slice(2)))).toBeUndefined();
    expect(rngOfReply(controlReply.rng(hex.toUpperCase()))).toBeUndefined();
    expect(rngOfReply("ok rng")).toBeUndefined();
  });
});

// The writers take their names from protocol.ts; this checks that they put them where the init
// looks for them.
describe("the host side and protocol.ts", () => {
  it("attaches the disks by those serials and passes a command in that parameter", () => {
    const devices = guestDevices({ root: "r", rw: "w", cfg: "c" }, null).join(" ");
    for (const serial of Object.values(GUEST_DISKS)) expect(devices).toContain(`serial=${serial}`);
    expect(kernelCmdline({ command: "true" }).split(" ")).toContain(
      `${CMDLINE_COMMAND}=${Buffer.from("true").toString("base64")}`,
    );
  });

  it("writes the config names the init reads", () => {
    const network = {
      enabled: true,
      mac: "02:00:00:00:00:01",
      ip: "10.64.16.7",
      subnet: "10.64.16.0/20",
      bandwidth_download_bps: null,
      bandwidth_upload_bps: null,
    };
    const text = guestConfig(
      { id: "i1", name: "n", entrypoint: ["/bin/true"], cmd: null, env: {}, network },
      { name: "i", entrypoint: null, cmd: null, env: {}, working_dir: "" },
    );
    expect(text).toMatch(new RegExp(`^${GUEST_CONFIG.hostname}=`, "m"));
    expect(text).toMatch(new RegExp(`^${GUEST_CONFIG.workdir}=`, "m"));
    expect(text).toMatch(new RegExp(`^${GUEST_CONFIG.address}='10\\.64\\.16\\.7/20'$`, "m"));
    expect(text).toMatch(new RegExp(`^${GUEST_CONFIG.gateway}='10\\.64\\.16\\.1'$`, "m"));
    expect(text).toMatch(new RegExp(`^${GUEST_CONFIG.machineId}='[0-9a-f]{32}'$`, "m"));
    expect(text).toMatch(new RegExp(`^${GUEST_CONFIG.env}\\(\\) \\{`, "m"));
    expect(text).toMatch(/^set -- /m);
  });
});

describe("the guest agent (agent.c) and agent-protocol.ts", () => {
  const agent = readFileSync(new URL("./agent.c", import.meta.url), "utf8");
  const define = (name: string) => new RegExp(`^#define ${name} (.+)$`, "m").exec(agent)?.[1];
  const cEnum = (prefix: "H" | "G") =>
    Object.fromEntries(
      [...agent.matchAll(new RegExp(`\\b${prefix}_([A-Z]+) = (\\d+)`, "g"))].map((m) => [
        (m[1] ?? "").toLowerCase(),
        Number(m[2]),
      ]),
    );

  it("uses the port, sizes and windows agent-protocol.ts names", () => {
    expect(define("PORT_NAME")).toBe(JSON.stringify(AGENT_PORT));
    expect(define("HDR")).toBe(String(HEADER_BYTES));
    expect(define("MAX_PAYLOAD")).toBe(String(MAX_PAYLOAD));
    expect(define("OUT_WINDOW")).toBe(`(${OUT_WINDOW / 1024} * 1024)`);
    expect(define("IN_WINDOW")).toBe(`(${IN_WINDOW / 1024} * 1024)`);
    expect(define("MAX_SESSIONS")).toBe(String(MAX_SESSIONS));
    expect(define("HELLO_TEXT")).toBe(JSON.stringify(HELLO_TEXT));
    expect(agent).toContain(`code = ${TIMEOUT_EXIT_CODE};`);
  });

  it("numbers the frames as agent-protocol.ts does, both ways", () => {
    expect(cEnum("H")).toEqual(HOST);
    expect(cEnum("G")).toEqual(GUEST);
  });

  it("reads and writes the fields agent-protocol.ts tags", () => {
    const parsed = [...cFunction("parse_request", agent).matchAll(/case '(.)':/g)].map((m) => m[1]);
    expect(sorted(parsed as string[])).toEqual(sorted(Object.values(OPEN_FIELDS)));
    const exitTags = [...cFunction("end_session", agent).matchAll(/field[f]?\(&f, '(.)'/g)].map(
      (m) => m[1],
    );
    expect(sorted(exitTags as string[])).toEqual(sorted(Object.values(EXIT_FIELDS)));
    const statTags = [...cFunction("do_stat", agent).matchAll(/field[f]?\(&f, '(.)'/g)].map(
      (m) => m[1],
    );
    expect(sorted(statTags as string[])).toEqual(sorted(Object.values(STAT_FIELDS)));
  });

  it("is started by the init, in the image's root, when the config asks for it", () => {
    expect(init).toContain(`if [ -n "$${GUEST_CONFIG.agent}" ]; then`);
    expect(init).toContain(
      'exec /bin/chroot /newroot /.offshoot/offshoot-agent "$OFFSHOOT_WORKDIR"',
    );
    const image = { name: "img", entrypoint: null, cmd: null, env: {}, working_dir: "/" };
    const on = guestConfig(spec("i", { entrypoint: ["/bin/true"] }), image);
    const off = guestConfig(
      spec("i", { entrypoint: ["/bin/true"], skip_guest_agent: true }),
      image,
    );
    expect(off).toContain(`${GUEST_CONFIG.agent}=''`);
    expect(on).toContain(`${GUEST_CONFIG.agent}='1'`);
  });
});
