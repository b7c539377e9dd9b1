import { loadEnv } from "./env.ts";
import { jsonLog } from "./log.ts";
import { startServer } from "./server.ts";

const log = jsonLog("control-plane", process.env.LOG_LEVEL === "debug" ? "debug" : "info");
const server = await startServer(loadEnv(), log);

let stopping = false;
for (const sig of ["SIGTERM", "SIGINT"] as const) {
  process.on(sig, () => {
    if (stopping) return;
    stopping = true;
    log("info", "shutting down", { signal: sig });
    server.close().then(
      () => process.exit(0),
      (e: unknown) => {
        log("error", "shutdown failed", { error: String(e) });
        process.exit(1);
      },
    );
  });
}
