import { existsSync, readdirSync, readFileSync } from "node:fs";
import { afterEach } from "vitest";
import type { Db } from "../../control-plane/src/db/client.ts";
import { agentPaths } from "../../host-agent/src/paths.ts";
import { TestNamespaces } from "../../host-agent/testing/netns.ts";
import { ensureTestImage } from "../../scripts/oci-image.ts";
import { defaultAssetsDir } from "../../scripts/vm-assets.ts";
import {
  type AgentProcess,
  type CpProcess,
  hostOnline,
  onCleanup,
  registerHost,
  seedTenant,
  spawnAgent,
  spawnControlPlane,
  testDatabase,
} from "../harness.ts";

export interface Stack {
  db: Db;
  dbUrl: string;
  cp: CpProcess;
  agents: AgentProcess[];
  hostIds: string[];
  apiKey: string;
  tenantId: string;
}

/**
 * One real stack per test file: its own database on the Postgres server, a control-plane
 * process, and `agents` agent processes (sim unless their env says otherwise) connected over
 * WebSockets. A QEMU agent not given AGENT_NETNS gets a network namespace of its own, made here,
 * so that its guests' bridge and TAPs never touch the machine's network. Torn down after the file.
 */
export async function startStack(
  opts: { agents?: Array<Record<string, string>>; cpEnv?: Record<string, string> } = {},
): Promise<Stack> {
  const database = await testDatabase();
  const { tenantId, apiKey } = await seedTenant(database.database.db);
  const cp = await spawnControlPlane({ databaseUrl: database.url, env: opts.cpEnv });
  const agents: AgentProcess[] = [];
  const hostIds: string[] = [];
  const spaces = new TestNamespaces();
  for (const given of opts.agents ?? [{}]) {
    const env = { ...given };
    if (env.AGENT_DRIVER === "qemu" && env.AGENT_NETNS === undefined) {
      env.AGENT_NETNS = await spaces.create("stack");
    }
    const { hostId, token } = await registerHost(database.database.db);
    agents.push(await spawnAgent({ cpUrl: cp.url, token, env }));
    hostIds.push(hostId);
    await hostOnline(database.database.db, hostId);
  }
  // Processes and the database go with the harness's cleanup, after the file; so does this.
  onCleanup(() => spaces.cleanup());
  return { db: database.database.db, dbUrl: database.url, cp, agents, hostIds, apiKey, tenantId };
}

/** A QEMU agent's environment for startStack: TCG, the built guest assets, the test image, and
 * room for a few small guests; `over` adds to it or replaces parts. */
export function qemuAgentEnv(over: Record<string, string> = {}): Record<string, string> {
  return {
    AGENT_DRIVER: "qemu",
    AGENT_ACCEL: "tcg",
    AGENT_VM_ASSETS: defaultAssetsDir(),
    AGENT_IMAGES: ensureTestImage(),
    AGENT_VCPUS: "8",
    AGENT_MEMORY: "4GB",
    ...over,
  };
}

/** Kills the QEMU guests a stack's agents left running: guests outlive their agent by design,
 * so whatever a failed test left behind goes here (after the file). */
export function killStackGuests(stack: Stack | undefined): void {
  for (const agent of stack?.agents ?? []) {
    const { qemu } = agentPaths(agent.dataDir);
    const dirs = existsSync(qemu.instancesDir)
      ? readdirSync(qemu.instancesDir, { withFileTypes: true })
      : [];
    for (const id of dirs.filter((e) => e.isDirectory())) {
      try {
        const pid = Number(readFileSync(qemu.pidFile(id.name), "utf8"));
        if (pid > 0) process.kill(pid, "SIGKILL");
      } catch {
        // no pid file or no such process: nothing running for this instance
      }
    }
  }
}

/** The output a failed test's stack printed last, per process (its control plane's, each
 * agent's), written to the test's output so that a CI log shows what they said. */
export function printStackOnFailure(stack: () => Stack | undefined, chars = 20_000): void {
  afterEach((ctx) => {
    const s = stack();
    if (ctx.task.result?.state !== "fail" || !s) return;
    for (const [name, p] of [
      ["control plane", s.cp],
      ...s.agents.map((a, i) => [`agent ${i}`, a] as const),
    ] as const) {
      console.log(`--- ${name}, last ${chars} characters of output:\n${p.output().slice(-chars)}`);
    }
  });
}
