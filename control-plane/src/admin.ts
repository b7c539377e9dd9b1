// Administration from the command line: `npm run admin -- <noun> <verb> [args]`.
// Uses DATABASE_URL, or the embedded database under DATA_DIR (stop `npm start` first: the
// embedded database serves one process at a time, and says so when it is held).
// Exit codes: 0 done, 1 failed (one line on stderr), 2 not a command (usage on stderr).
import { parseArgs } from "node:util";
import { asc, eq } from "drizzle-orm";
import { openDatabase } from "./db/open.ts";
import { apiKeys, hosts, tenants } from "./db/schema/index.ts";
import { loadEnv } from "./env.ts";
import { createApiKey, createHost, ensureTenant, revokeApiKey } from "./services/credentials.ts";

const USAGE = `usage: npm run admin -- <command>
  tenant create <name>            create a tenant (idempotent)
  tenant list
  key create <tenant> [--name N]  create an API key for a tenant; prints it once
  key list <tenant>
  key revoke <key-id>
  host create <name>              register a host (or rotate its token); prints the token once
  host list
  help, --help, -h                this text
Against DATABASE_URL if set, else the embedded database under DATA_DIR (default .data), which
must not be open in another process (npm start) meanwhile.`;

/** The commands, and whether each takes an argument. */
const COMMANDS: Record<string, "arg" | null> = {
  "tenant create": "arg",
  "tenant list": null,
  "key create": "arg",
  "key list": "arg",
  "key revoke": "arg",
  "host create": "arg",
  "host list": null,
};

async function main(argv: string[]): Promise<number> {
  let parsed: ReturnType<typeof parse>;
  try {
    parsed = parse(argv);
  } catch (e) {
    // An unknown option or one without its value: say which, then how it is used.
    console.error(oneLine(e));
    console.error(USAGE);
    return 2;
  }
  const { positionals, values } = parsed;
  if (values.help || positionals[0] === "help") {
    console.log(USAGE);
    return 0;
  }
  const [noun, verb, arg] = positionals;
  // Checked before the database is opened: a mistyped command is told so, whatever the state
  // of the database.
  const takes = COMMANDS[`${noun} ${verb}`];
  if (takes === undefined || (takes === "arg" && !arg) || positionals.length > (takes ? 3 : 2)) {
    console.error(USAGE);
    return 2;
  }
  const env = loadEnv();
  const database = await openDatabase({
    url: env.DATABASE_URL,
    pgliteDir: `${env.DATA_DIR}/pglite`,
  });
  const { db } = database;
  try {
    switch (`${noun} ${verb}`) {
      case "tenant create": {
        if (!arg) break;
        console.log(JSON.stringify({ tenant_id: await ensureTenant(db, arg), name: arg }));
        return 0;
      }
      case "tenant list": {
        const rows = await db.select().from(tenants).orderBy(asc(tenants.createdAt));
        for (const t of rows) console.log(JSON.stringify({ tenant_id: t.id, name: t.name }));
        return 0;
      }
      case "key create": {
        if (!arg) break;
        const [t] = await db.select().from(tenants).where(eq(tenants.name, arg));
        if (!t) {
          console.error(`no tenant named ${arg} (create it with: tenant create ${arg})`);
          return 1;
        }
        const { id, key } = await createApiKey(db, t.id, { name: values.name });
        console.log(JSON.stringify({ key_id: id, tenant: arg, api_key: key }));
        return 0;
      }
      case "key list": {
        if (!arg) break;
        const rows = await db
          .select({
            id: apiKeys.id,
            prefix: apiKeys.prefix,
            name: apiKeys.name,
            revokedAt: apiKeys.revokedAt,
          })
          .from(apiKeys)
          .innerJoin(tenants, eq(tenants.id, apiKeys.tenantId))
          .where(eq(tenants.name, arg));
        for (const k of rows)
          console.log(
            JSON.stringify({
              key_id: k.id,
              prefix: k.prefix,
              name: k.name,
              revoked_at: k.revokedAt,
            }),
          );
        return 0;
      }
      case "key revoke": {
        if (!arg) break;
        if (!(await revokeApiKey(db, arg))) {
          console.error(`no active key ${arg}`);
          return 1;
        }
        console.log(JSON.stringify({ key_id: arg, revoked: true }));
        return 0;
      }
      case "host create": {
        if (!arg) break;
        const { id, token } = await createHost(db, arg);
        console.log(JSON.stringify({ host_id: id, name: arg, host_token: token }));
        return 0;
      }
      case "host list": {
        const rows = await db.select().from(hosts).orderBy(asc(hosts.name));
        for (const h of rows) {
          console.log(
            JSON.stringify({
              host_id: h.id,
              name: h.name,
              status: h.status,
              driver: h.driver,
              vcpus: h.vcpus,
              memory_bytes: h.memoryBytes,
              last_seen_at: h.lastSeenAt,
            }),
          );
        }
        return 0;
      }
    }
    console.error(USAGE);
    return 2;
  } finally {
    await database.close();
  }
}

function parse(argv: string[]) {
  return parseArgs({
    args: argv,
    allowPositionals: true,
    options: { name: { type: "string" }, help: { type: "boolean", short: "h" } },
  });
}

/** An error as the one line an operator needs: its message's first line, no stack. */
function oneLine(e: unknown): string {
  const message = e instanceof Error ? e.message : String(e);
  return message.split("\n").find((l) => l.trim()) ?? String(e);
}

// Whatever fails — the environment, the database, a statement — is one line on stderr and exit
// code 1; a stack trace (or, from PGlite's WASM, a page of minified source) helps no operator.
const fail = (e: unknown) => {
  console.error(`admin: ${oneLine(e)}`);
  process.exit(1);
};
process.on("uncaughtException", fail);
process.on("unhandledRejection", fail);
process.exitCode = await main(process.argv.slice(2)).catch((e: unknown) => {
  console.error(`admin: ${oneLine(e)}`);
  return 1;
});
