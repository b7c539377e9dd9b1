// Runs once per `vitest run`, in the main process, before any test file.
//
// 1. A Postgres server: TEST_DATABASE_URL if set, else a throwaway one from scripts/postgres.ts.
//    The URL reaches the forked test workers twice over: through process.env (vitest builds each
//    worker's environment from the main process's env after global setup has run) and through
//    `project.provide("testDatabaseUrl")`, which test/harness.ts reads with `inject` as a fallback.
// 2. A template database, offshoot_template, with the project's migrations applied: each test
//    gets its own copy with `CREATE DATABASE … TEMPLATE offshoot_template` (test/harness.ts).
// 3. The web console's build (scripts/build-console.ts), when its sources changed.
// At the end: deletes the network namespaces (oft-<run>-*) a failed test file of this run left
// behind, and stale ones of runs killed before their end.

import { randomBytes } from "node:crypto";
import postgres from "postgres";
import type { TestProject } from "vitest/node";
import { openPostgres } from "../control-plane/src/db/open.ts";
import { deleteLeftoverTestNetns, TEST_RUN_ENV } from "../host-agent/testing/netns.ts";
import { buildConsole } from "../scripts/build-console.ts";
import { ensurePostgres, type PostgresServer } from "../scripts/postgres.ts";

export const TEMPLATE_DB = "offshoot_template";

declare module "vitest" {
  export interface ProvidedContext {
    testDatabaseUrl: string;
  }
}

/** The same server URL with another database name. */
export function withDatabase(serverUrl: string, database: string): string {
  const u = new URL(serverUrl);
  u.pathname = `/${database}`;
  return u.toString();
}

let started: PostgresServer | undefined;

export async function setup(project: TestProject): Promise<void> {
  // Names this run's network namespaces (host-agent/testing/netns.ts); workers inherit it.
  process.env[TEST_RUN_ENV] ??= randomBytes(3).toString("hex");
  let url = process.env.TEST_DATABASE_URL;
  if (!url) {
    started = await ensurePostgres();
    url = started.url;
    process.env.TEST_DATABASE_URL = url;
  }
  project.provide("testDatabaseUrl", url);

  const t0 = Date.now();
  const admin = postgres(url, { max: 1, onnotice: () => {} });
  try {
    // Rebuilt every run so that it always holds the current migrations.
    await admin.unsafe(`DROP DATABASE IF EXISTS ${TEMPLATE_DB} WITH (FORCE)`);
    await admin.unsafe(`CREATE DATABASE ${TEMPLATE_DB}`);
  } finally {
    await admin.end({ timeout: 5 });
  }
  const template = await openPostgres(withDatabase(url, TEMPLATE_DB), { max: 1 });
  await template.close();
  process.stderr.write(`[global-setup] ${TEMPLATE_DB} migrated in ${Date.now() - t0} ms\n`);
  // The web console's files, for the browser tests and wrangler dev.
  const t1 = Date.now();
  if ((await buildConsole()) === "built") {
    process.stderr.write(`[global-setup] console built in ${Date.now() - t1} ms\n`);
  }
}

export async function teardown(): Promise<void> {
  const left = await deleteLeftoverTestNetns().catch((e: unknown) => {
    process.stderr.write(`[global-setup] cannot list network namespaces: ${String(e)}\n`);
    return [];
  });
  if (left.length > 0) {
    process.stderr.write(`[global-setup] deleted leftover network namespaces: ${left.join(" ")}\n`);
  }
  if (started) {
    await started.stop();
    started = undefined;
  }
}
