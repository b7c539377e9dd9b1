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

  it("sets hostname and MAC in one command, and asks for a stop", async () => {
    const sock = await fakeGuest((line) => {
      if (line === "identity fork-1 02:00:00:00:00:0a")
        return "ok identity fork-1 02:00:00:00:00:0a\n";
      if (line === "identity fork-2 -") return "ok identity fork-2 -\n";
      if (line === "identity fork-3 02:00:00:00:00:0b")
        return "ok identity other 02:00:00:00:00:0b\n";
      if (line === "stop") return "err stop no program to stop\n";
      return undefined;
    });
    await setGuestIdentity(sock, "fork-1", "02:00:00:00:00:0A");
    await setGuestIdentity(sock, "fork-2", null);
    await expect(setGuestIdentity(sock, "fork-3", "02:00:00:00:00:0b")).rejects.toThrow(
      /did not take fork-3/,
    );
    expect(await askGuestToStop(sock)).toBe(false);
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
