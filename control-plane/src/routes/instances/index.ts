import type { UpgradeWebSocket } from "hono/ws";
import type { Router } from "../common.ts";
import { registerCreateInstance } from "./create.ts";
import { registerDeleteInstance } from "./delete.ts";
import { registerForkInstance } from "./fork.ts";
import { registerGetInstance } from "./get.ts";
import { registerListInstances } from "./list.ts";
import { registerInstanceLogs } from "./logs.ts";
import { registerRestoreInstance } from "./restore.ts";
import { registerStandbyInstance } from "./standby.ts";
import { registerStartInstance } from "./start.ts";
import { registerInstanceStat } from "./stat.ts";
import { registerStopInstance } from "./stop.ts";
import { registerInstanceStreams } from "./streams.ts";
import { registerWaitForState } from "./wait.ts";

// One file per operation, each a thin transport: validate, call one service verb, return.
// Errors are mapped in app.ts. The order here is the order of paths in /openapi.json.
export function registerInstanceRoutes(app: Router, upgrade?: UpgradeWebSocket<unknown>) {
  registerCreateInstance(app);
  registerListInstances(app);
  registerGetInstance(app);
  registerDeleteInstance(app);
  registerStartInstance(app);
  registerStopInstance(app);
  registerStandbyInstance(app);
  registerRestoreInstance(app);
  registerForkInstance(app);
  registerWaitForState(app);
  registerInstanceLogs(app);
  registerInstanceStat(app);
  registerInstanceStreams(app, upgrade);
}
