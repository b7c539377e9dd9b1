// The one way the network module runs an external command (ip, tc, nft, sysctl, nsenter): with
// a time bound, bounded output, and an error that names the command and carries its stderr.
import { execa } from "execa";

/** Any of these tools prints a few KiB at most; a JSON link listing of a busy host some 100 KiB. */
export const MAX_OUTPUT_BYTES = 4 * 1024 * 1024;
/** Netlink and nft transactions answer in milliseconds; anything slower is stuck. */
export const COMMAND_TIMEOUT_MS = 30_000;
/** How much of stderr an error message quotes. */
const MAX_STDERR_IN_MESSAGE = 2_000;

export interface RunOptions {
  /** Written to the command's stdin (e.g. an nft ruleset for `nft -f -`). */
  input?: string;
  /** A failure whose stderr matches is not an error: run returns null (e.g. "already gone"). */
  tolerate?: RegExp;
  timeoutMs?: number;
}

export interface RunResult {
  stdout: string;
  stderr: string;
}

export class CommandError extends Error {
  constructor(
    readonly argv: readonly string[],
    readonly exitCode: number | undefined,
    readonly stderr: string,
    detail: string,
  ) {
    const said = stderr.trim().slice(0, MAX_STDERR_IN_MESSAGE);
    super(`\`${formatArgv(argv)}\` ${detail}${said ? `: ${said}` : ""}`);
    this.name = "CommandError";
  }
}

/** Shell-like rendering of an argv, for messages only. */
export function formatArgv(argv: readonly string[]): string {
  return argv.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : JSON.stringify(a))).join(" ");
}

export async function run(
  argv: readonly string[],
  opts: RunOptions = {},
): Promise<RunResult | null> {
  const [file, ...args] = argv;
  if (!file) throw new Error("run: empty command");
  const r = await execa(file, args, {
    reject: false,
    input: opts.input,
    stdin: opts.input === undefined ? "ignore" : undefined,
    maxBuffer: MAX_OUTPUT_BYTES,
    timeout: opts.timeoutMs ?? COMMAND_TIMEOUT_MS,
    env: { LC_ALL: "C" },
  });
  const stdout = String(r.stdout ?? "");
  const stderr = String(r.stderr ?? "");
  if (!r.failed) return { stdout, stderr };
  if (opts.tolerate && r.exitCode !== undefined && !r.timedOut && opts.tolerate.test(stderr)) {
    return null;
  }
  const detail = r.timedOut
    ? `timed out after ${opts.timeoutMs ?? COMMAND_TIMEOUT_MS} ms`
    : r.isMaxBuffer
      ? `printed more than ${MAX_OUTPUT_BYTES} bytes`
      : r.exitCode !== undefined
        ? `exited with ${r.exitCode}`
        : `failed (${r.signal ?? r.code ?? r.shortMessage})`;
  throw new CommandError(argv, r.exitCode, stderr, detail);
}

/** run() for a command that must succeed (no `tolerate`): never null. */
export async function runOk(argv: readonly string[], opts: Omit<RunOptions, "tolerate"> = {}) {
  return (await run(argv, opts)) as RunResult;
}
