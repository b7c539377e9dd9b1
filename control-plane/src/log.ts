/** One JSON object per line on stdout; tests and operators grep the `msg`. */
export type Log = (
  level: "debug" | "info" | "warn" | "error",
  msg: string,
  fields?: Record<string, unknown>,
) => void;

export const jsonLog =
  (component: string, minLevel: "debug" | "info" = "info"): Log =>
  (level, msg, fields) => {
    if (level === "debug" && minLevel !== "debug") return;
    const line = JSON.stringify({ t: new Date().toISOString(), level, component, msg, ...fields });
    (level === "error" || level === "warn" ? process.stderr : process.stdout).write(`${line}\n`);
  };

export const silentLog: Log = () => {};
