import { afterAll } from "vitest";
import type { Db } from "../../control-plane/src/db/client.ts";
import {
  type AgentProcess,
  type CpProcess,
  hostOnline,
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
 * process, and `agents` sim agent processes connected over WebSockets. Torn down after the file.
 */
export async function startStack(
  opts: { agents?: Array<Record<string, string>>; cpEnv?: Record<string, string> } = {},
): Promise<Stack> {
  const database = await testDatabase();
  const { tenantId, apiKey } = await seedTenant(database.database.db);
  const cp = await spawnControlPlane({ databaseUrl: database.url, env: opts.cpEnv });
  const agents: AgentProcess[] = [];
  const hostIds: string[] = [];
  for (const env of opts.agents ?? [{}]) {
    const { hostId, token } = await registerHost(database.database.db);
    agents.push(await spawnAgent({ cpUrl: cp.url, token, env }));
    hostIds.push(hostId);
    await hostOnline(database.database.db, hostId);
  }
  afterAll(async () => {
    await Promise.all(agents.map((a) => a.stop()));
    await cp.stop();
    await database.drop();
  });
  return { db: database.database.db, dbUrl: database.url, cp, agents, hostIds, apiKey, tenantId };
}
