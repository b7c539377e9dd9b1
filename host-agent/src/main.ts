// Entry point: `node --import tsx host-agent/src/main.ts` (or `npx tsx …`). Configuration comes
// from the environment only; see config.ts.
import { startAgent } from "./agent.ts";
import { ConfigError, loadConfig } from "./config.ts";
import { errorMessage, stdoutLogger as log } from "./log.ts";

// Losing the log reader must not take down the agent (and, with it, command handling).
process.stdout.on("error", (err: NodeJS.ErrnoException) => {
  if (err.code !== "EPIPE") throw err;
});

async function main(): Promise<void> {
  const config = loadConfig();
  const agent = await startAgent(config);
  let stopping = false;
  const shutdown = (why: string) => {
    if (stopping) return;
    stopping = true;
    log("info", "stopping", { why });
    agent.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        log("error", "shutdown failed", { error: errorMessage(err) });
        process.exit(1);
      },
    );
  };
  process.once("SIGTERM", shutdown);
  process.once("SIGINT", shutdown);
  if (config.parentPid !== undefined) {
    setInterval(() => {
      if (process.ppid !== config.parentPid) shutdown("its parent process exited");
    }, 500).unref();
  }
}

main().catch((err: unknown) => {
  const msg = err instanceof ConfigError ? "invalid configuration" : "agent failed to start";
  log("error", msg, { error: errorMessage(err) });
  process.exit(1);
});
