// The control channel's host side against a fake guest (a unix socket server); the real guest's
// responder is covered by launch.test.ts and qemu-driver.test.ts.
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import {
  askGuestToStop,
  guestControl,
  guestMac,
  guestNet,
  setGuestIdentity,
  setGuestMac,
} from "./control.ts";

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0)) c();
});

/** A fake guest: answers each received line with what `reply` returns (undefined: silence). */
async function fakeGuest(reply: (line: string) => string | undefined): Promise<string> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "octl-"));
  const sock = path.join(dir, "ctl.sock");
  const server = net.createServer((c) => {
    let buf = "";
    c.setEncoding("utf8");
    c.on("data", (d: string) => {
      buf += d;
      for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
        const out = reply(buf.slice(0, nl));
        buf = buf.slice(nl + 1);
        if (out !== undefined) c.write(out);
      }
    });
  });
  await new Promise<void>((r) => server.listen(sock, r));
  cleanups.push(() => {
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return sock;
}

describe("guest control channel", () => {
  it("sends a command and returns the reply line, skipping stale lines", async () => {
    const sock = await fakeGuest((line) =>
      line === "ping" ? "pong\n" : `pong\nok mac 02:00:00:00:00:0${line.endsWith("1") ? 1 : 2}\n`,
    );
    expect(await guestControl(sock, "ping")).toBe("pong");
    await setGuestMac(sock, "02:00:00:00:00:01");
    expect(await guestMac(sock)).toBe("02:00:00:00:00:02");
  });

  it("sets the identity in one command, reads the network back, and asks for a stop", async () => {
    const id = "0123456789abcdef0123456789abcdef";
    const seed = Buffer.alloc(32, 0xab);
    const hex = "ab".repeat(32);
    const sock = await fakeGuest((line) => {
      if (line === `identity fork-1 02:00:00:00:00:0a 10.64.0.5/20 10.64.0.1 ${id} ${hex}`)
        return "ok identity fork-1 02:00:00:00:00:0a 10.64.0.5/20\n";
      if (line === `identity fork-2 - - - ${id} ${hex}`) return "ok identity fork-2 - -\n";
      if (line.startsWith("identity fork-3 "))
        return "ok identity fork-3 02:00:00:00:00:0b 10.64.0.9/20\n";
      if (line.startsWith("identity fork-4 ")) return "err identity rng: Operation not permitted\n";
      if (line === "query net") return "ok mac 02:00:00:00:00:01\nok net 02:00:00:00:00:0a - -\n";
      if (line === "stop") return "err stop no program to stop\n";
      return undefined;
    });
    const identity = {
      hostname: "fork-1",
      mac: "02:00:00:00:00:0A",
      address: "10.64.0.5/20",
      gateway: "10.64.0.1",
      machineId: id,
    };
    await setGuestIdentity(sock, identity, seed);
    await setGuestIdentity(
      sock,
      { hostname: "fork-2", mac: null, address: null, gateway: null, machineId: id },
      seed,
    );
    // Another address than asked for, an error, a seed of the wrong size.
    await expect(
      setGuestIdentity(sock, { ...identity, hostname: "fork-3", mac: "02:00:00:00:00:0b" }, seed),
    ).rejects.toThrow(/did not take identity fork-3 02:00:00:00:00:0b 10.64.0.5\/20: ok identity/);
    await expect(setGuestIdentity(sock, { ...identity, hostname: "fork-4" }, seed)).rejects.toThrow(
      /err identity rng/,
    );
    await expect(setGuestIdentity(sock, identity, Buffer.alloc(16))).rejects.toThrow(/32 bytes/);
    // A stale `ok mac` line is not the answer to `query net`.
    expect(await guestNet(sock)).toEqual({
      mac: "02:00:00:00:00:0a",
      address: null,
      gateway: null,
    });
    expect(await askGuestToStop(sock)).toBe(false);
  });

  it("keeps the seed out of a timeout's message", async () => {
    const sock = await fakeGuest(() => undefined);
    const identity = {
      hostname: "quiet",
      mac: null,
      address: null,
      gateway: null,
      machineId: "0".repeat(32),
    };
    const err = await setGuestIdentity(sock, identity, Buffer.alloc(32, 0xcd), {
      timeoutMs: 100,
    }).catch((e: Error) => e);
    expect(String(err)).toMatch(/no reply to "identity quiet …"/);
    expect(String(err)).not.toContain("cdcd");
  });

  it("rejects an error, a different MAC, silence and a missing socket", async () => {
    const sock = await fakeGuest((line) =>
      line.startsWith("mac 02:00:00:00:00:0e")
        ? "err mac RTNETLINK answers: busy\n"
        : line.startsWith("mac 02:00:00:00:00:0f")
          ? "ok mac 02:00:00:00:00:01\n"
          : undefined,
    );
    await expect(setGuestMac(sock, "02:00:00:00:00:0e")).rejects.toThrow(/err mac RTNETLINK/);
    await expect(setGuestMac(sock, "02:00:00:00:00:0f")).rejects.toThrow(/did not take MAC/);
    await expect(guestControl(sock, "ping", { timeoutMs: 200 })).rejects.toThrow(
      /no reply to "ping" within 200 ms/,
    );
    await expect(guestControl(`${sock}.missing`, "ping")).rejects.toThrow(/ENOENT/);
  });
});
