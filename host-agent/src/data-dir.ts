// One agent per data dir: two agents sharing a journal would each execute the other's
// commands. A pid file catches a second process; the set catches a second agent in-process.
import { readFile, rm, writeFile } from "node:fs/promises";
import type { AgentPaths } from "./paths.ts";

const claimed = new Set<string>();

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Resolves to the function that gives the dir back. */
export async function claimDataDir(paths: AgentPaths): Promise<() => Promise<void>> {
  if (claimed.has(paths.root)) throw new Error(`data dir ${paths.root} is in use by another agent`);
  const previous = Number.parseInt(await readFile(paths.pidFile, "utf8").catch(() => ""), 10);
  // A pid file left by a killed agent names a dead process (or, rarely, a reused pid: the
  // operator is told which, rather than the journal being shared).
  if (previous > 0 && previous !== process.pid && alive(previous)) {
    throw new Error(`data dir ${paths.root} is in use by agent pid ${previous} (${paths.pidFile})`);
  }
  claimed.add(paths.root);
  await writeFile(paths.pidFile, `${process.pid}\n`);
  return async () => {
    claimed.delete(paths.root);
    const owner = Number.parseInt(await readFile(paths.pidFile, "utf8").catch(() => ""), 10);
    if (owner === process.pid) await rm(paths.pidFile, { force: true });
  };
}
