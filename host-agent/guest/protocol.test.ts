// The init script and protocol.ts, held to each other: each name one side uses must be the
// other's. The init is read as text; its behaviour is tested with real guests (launch.test.ts,
// qemu-driver.test.ts).
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { guestConfig } from "../src/drivers/qemu/guest-config.ts";
import { guestDevices, kernelCmdline } from "../src/drivers/qemu/launch.ts";
import {
  CMDLINE_COMMAND,
  CONTROL_PORT,
  CONTROL_VERBS,
  COUNT_MARKER,
  controlCommand,
  controlReply,
  GUEST_CONFIG,
  GUEST_DISKS,
  INIT_EVENT_FIELDS,
  INIT_MARKER,
  NO_MAC,
} from "./protocol.ts";

const init = readFileSync(new URL("./init", import.meta.url), "utf8");

const all = (re: RegExp, text = init) => [...text.matchAll(re)].map((m) => m[1] ?? "");
const sorted = (xs: Iterable<string>) => [...new Set(xs)].sort();

/** The body of the init's shell function `name`, up to its closing brace at column 0. */
function shellFunction(name: string): string {
  const start = init.indexOf(`\n${name}() {\n`);
  expect(start, `${name}() in the init`).toBeGreaterThanOrEqual(0);
  return init.slice(start, init.indexOf("\n}\n", start));
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
    expect(sorted(all(/\bdisk (offshoot-[\w-]+)/g))).toEqual(sorted(Object.values(GUEST_DISKS)));
  });

  it("reads exactly the config names protocol.ts exports", () => {
    const read = all(/\b(OFFSHOOT_[A-Z_]+|offshoot_[a-z_]+)\b/g);
    expect(sorted(read)).toEqual(sorted(Object.values(GUEST_CONFIG)));
    expect(init).toContain(". /run/offshoot/config.sh");
  });

  it("takes its command from the kernel command line parameter protocol.ts names", () => {
    expect(sorted(all(/\b(offshoot\.\w+)=/g))).toEqual([CMDLINE_COMMAND]);
  });

  it("answers the control verbs and replies protocol.ts names, on its port", () => {
    expect(shellFunction("ctl_port")).toContain(`= ${CONTROL_PORT} ]`);
    const serve = shellFunction("ctl_serve");
    const verbs = all(/^ {8}([a-z_]+)\)/gm, serve);
    expect(sorted(verbs)).toEqual(sorted(CONTROL_VERBS));
    // `query mac` is the one query; `identity NAME -` leaves the NICs alone.
    expect(serve).toContain(`"$arg" = ${controlCommand.queryMac.split(" ")[1]} ]`);
    expect(shellFunction("ctl_identity")).toContain(`"$2" = ${NO_MAC} ]`);
    const echoes = (reply: string) =>
      init.includes(`echo ${reply}`) || init.includes(`echo "${reply}`);
    for (const reply of [
      controlReply.pong,
      controlReply.stop,
      controlReply.mac(""),
      controlReply.identity("", "").trimEnd(),
    ])
      expect(echoes(reply), reply).toBe(true);
    // Errors start `err <verb>`, so the host tells them from stale lines.
    const errors = all(/echo "err ([\w$]+)/g);
    expect(errors.length).toBeGreaterThan(0);
    for (const verb of errors) expect([...CONTROL_VERBS, "$verb"]).toContain(verb);
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
    const text = guestConfig(
      { name: "n", entrypoint: ["/bin/true"], cmd: null, env: {} },
      { name: "i", entrypoint: null, cmd: null, env: {}, working_dir: "" },
    );
    expect(text).toMatch(new RegExp(`^${GUEST_CONFIG.hostname}=`, "m"));
    expect(text).toMatch(new RegExp(`^${GUEST_CONFIG.workdir}=`, "m"));
    expect(text).toMatch(new RegExp(`^${GUEST_CONFIG.env}\\(\\) \\{`, "m"));
    expect(text).toMatch(/^set -- /m);
  });
});
