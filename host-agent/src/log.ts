// One JSON object per line on stdout, so operators' tools and the tests can read the same log.
export type LogLevel = "debug" | "info" | "warn" | "error";
export type Logger = (level: LogLevel, msg: string, fields?: Record<string, unknown>) => void;

export const stdoutLogger: Logger = (level, msg, fields = {}) => {
  process.stdout.write(
    `${JSON.stringify({ level, msg, ...fields, time: new Date().toISOString() })}\n`,
  );
};

export function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
