// The simulated driver's guest agent: a handful of built-in commands in memory, honouring the
// same session contract as a real guest's (credit for output, stdin until closed, timeout, kill),
// so the control plane's streams (relays across replicas and through Workers, flow control) are
// tested at the speed of the sim. It runs nothing on the host. Never evidence that exec works
// in a VM: the QEMU tests are.
import type { PathInfo } from "@offshoot/shared";
import { MAX_PAYLOAD, OUT_WINDOW, TIMEOUT_EXIT_CODE } from "../../../guest/agent-protocol.ts";
import type { ExecEnd, ExecRequest, Guest, Session, SessionHandlers } from "../../guest/link.ts";

/** Directories and files the simulated guest has. */
const FILES: Record<string, PathInfo> = {
  "/": { exists: true, is_dir: true, is_file: false, is_symlink: false, mode: 0o755, size: 4096 },
  "/etc": {
    exists: true,
    is_dir: true,
    is_file: false,
    is_symlink: false,
    mode: 0o755,
    size: 4096,
  },
  "/etc/hostname": {
    exists: true,
    is_dir: false,
    is_file: true,
    is_symlink: false,
    mode: 0o644,
    size: 4,
  },
};

/**
 * Commands: `echo ARGS…`, `cat` (stdin to stdout until it closes), `true`, `false`,
 * `exit N`, `sleep SECONDS`, `yes BYTES` (that many bytes of "y\n", as fast as credit allows),
 * `hostname` (the instance's name), `env NAME` (a variable of the request's env).
 */
export class SimGuest implements Guest {
  constructor(private hostname: string) {}

  exec(req: ExecRequest, handlers: SessionHandlers): Session {
    return new SimSession(req, handlers, this.hostname);
  }

  async stat(path: string, followLinks: boolean): Promise<PathInfo> {
    void followLinks;
    return FILES[path] ?? { exists: false };
  }
}

class SimSession implements Session {
  private credits = OUT_WINDOW;
  private ended = false;
  private timers: NodeJS.Timeout[] = [];
  private stdinClosed = false;
  private onCredit: (() => void) | undefined;
  private stdinEnded: (() => void) | undefined;

  constructor(
    private req: ExecRequest,
    private handlers: SessionHandlers,
    private hostname: string,
  ) {
    if (req.timeout > 0) {
      this.timers.push(
        setTimeout(
          () => this.finish({ code: TIMEOUT_EXIT_CODE, timedOut: true }),
          req.timeout * 1000,
        ),
      );
    }
    queueMicrotask(() => void this.run());
  }

  private async run(): Promise<void> {
    const [cmd = "", ...args] = this.req.command;
    switch (cmd) {
      case "echo":
        await this.out(`${args.join(" ")}\n`);
        return this.finish({ code: 0 });
      case "true":
        return this.finish({ code: 0 });
      case "false":
        return this.finish({ code: 1 });
      case "exit":
        return this.finish({ code: Number(args[0] ?? 0) });
      case "hostname":
        await this.out(`${this.hostname}\n`);
        return this.finish({ code: 0 });
      case "env":
        await this.out(`${this.req.env[args[0] ?? ""] ?? ""}\n`);
        return this.finish({ code: 0 });
      case "sleep":
        this.timers.push(setTimeout(() => this.finish({ code: 0 }), Number(args[0] ?? 0) * 1000));
        return;
      case "cat":
        if (!this.stdinClosed)
          await new Promise<void>((resolve) => {
            this.stdinEnded = resolve;
          });
        return this.finish({ code: 0 });
      case "yes": {
        let left = Number(args[0] ?? 0);
        const chunk = Buffer.from("y\n".repeat(MAX_PAYLOAD / 2));
        while (left > 0 && !this.ended) {
          const n = Math.min(left, chunk.length);
          await this.out(chunk.subarray(0, n));
          left -= n;
        }
        return this.finish({ code: 0 });
      }
      default:
        return this.finish({ code: 127, error: `${cmd}: not found (simulated guest)` });
    }
  }

  /** Sends output once the owner's credit allows. */
  private async out(data: string | Buffer): Promise<void> {
    const buf = typeof data === "string" ? Buffer.from(data) : data;
    while (!this.ended && this.credits < buf.length) {
      await new Promise<void>((resolve) => {
        this.onCredit = resolve;
      });
    }
    if (this.ended) return;
    this.credits -= buf.length;
    this.handlers.output(buf, "stdout");
  }

  private finish(end: ExecEnd): void {
    if (this.ended) return;
    this.ended = true;
    for (const t of this.timers) clearTimeout(t);
    this.onCredit?.();
    this.stdinEnded?.();
    this.handlers.end(end);
  }

  async write(data: Buffer): Promise<void> {
    if (this.req.command[0] === "cat") await this.out(data);
  }

  closeStdin(): void {
    this.stdinClosed = true;
    this.stdinEnded?.();
  }

  resize(): void {}

  credit(bytes: number): void {
    this.credits += bytes;
    const wake = this.onCredit;
    this.onCredit = undefined;
    wake?.();
  }

  kill(): void {
    if (this.ended) return;
    this.ended = true;
    for (const t of this.timers) clearTimeout(t);
    this.onCredit?.();
    this.stdinEnded?.();
  }
}
