import { loadEnvOrExit } from "./env.ts";
import { jsonLog } from "./log.ts";
import { startServer } from "./server.ts";

const log = jsonLog("control-plane", process.env.LOG_LEVEL === "debug" ? "debug" : "info");
// A promise nobody awaited must not end a server that holds every agent's connection: logged,
// loudly, as the defect it is (tests fail on this line).
process.on("unhandledRejection", (reason) => {
  log("error", "unhandled rejection", {
    error: String(reason),
    stack: reason instanceof Error ? reason.stack : undefined,
  });
});
const server = await startServer(loadEnvOrExit(), log);

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
