// `npm run db:migrate`: applies migrations/ to DATABASE_URL (a Postgres server) and exits. The
// Node control plane does this at start-up; the Worker cannot read migration files, so a
// Workers deployment runs this against its database first.
import { openPostgres } from "../control-plane/src/db/open.ts";

const url = process.env.DATABASE_URL;
if (!url) {
  process.stderr.write("DATABASE_URL is required (postgres://…)\n");
  process.exit(1);
}
const database = await openPostgres(url);
await database.close();
process.stdout.write("migrations applied\n");
