// Every path the agent writes, built in one place (as Hypeman's lib/paths does), so the on-disk
// layout can be read off this file and no caller joins user input onto a path by itself.
import path from "node:path";
import { InvalidRequestError } from "@offshoot/shared";

// CUID2 ids are lowercase alphanumerics; anything with a dot or slash could escape the data dir.
const SAFE_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

export interface AgentPaths {
  readonly root: string;
  /** Append-only JSON lines: command ids, steps and outcomes. */
  readonly journal: string;
  /** Holds the pid of the agent that owns this data dir. */
  readonly pidFile: string;
  /** The agent's own record of the operations it ran on an instance (log source "hypeman"). */
  operationsLog(id: string): string;
  readonly operationsLogDir: string;
  readonly sim: {
    /** One line per op the sim executed (not replayed), for tests. */
    readonly execLog: string;
    readonly instancesDir: string;
    instanceDir(id: string): string;
    stateFile(id: string): string;
    diskFile(id: string): string;
    snapshotFile(id: string): string;
    /** The simulated guest's console (log source "app"). */
    consoleLog(id: string): string;
  };
}

export function checkInstanceId(id: string): string {
  if (!SAFE_ID.test(id)) throw new InvalidRequestError(`invalid instance id "${id}"`);
  return id;
}

export function agentPaths(root: string): AgentPaths {
  const instancesDir = path.join(root, "sim", "instances");
  const instanceDir = (id: string) => path.join(instancesDir, checkInstanceId(id));
  return {
    root,
    journal: path.join(root, "journal.jsonl"),
    pidFile: path.join(root, "agent.pid"),
    operationsLogDir: path.join(root, "operations"),
    operationsLog: (id) => path.join(root, "operations", `${checkInstanceId(id)}.log`),
    sim: {
      execLog: path.join(root, "sim-exec.log"),
      instancesDir,
      instanceDir,
      stateFile: (id) => path.join(instanceDir(id), "state.json"),
      diskFile: (id) => path.join(instanceDir(id), "disk.img"),
      snapshotFile: (id) => path.join(instanceDir(id), "snapshot.bin"),
      consoleLog: (id) => path.join(instanceDir(id), "console.log"),
    },
  };
}
