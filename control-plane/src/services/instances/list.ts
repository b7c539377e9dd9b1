import type { Instance, InstanceState, Tags } from "@offshoot/shared";
import { and, asc, eq, getTableColumns, sql } from "drizzle-orm";
import { instances } from "../../db/schema/index.ts";
import type { Services } from "../context.ts";
import { present } from "./present.ts";

/** Instances read per query while listing: a listing holds at most this many at a time. */
export const LIST_PAGE = 100;

export interface ListFilter {
  state?: InstanceState;
  tags?: Tags;
}

/**
 * GET /instances: the tenant's instances, filtered by state and by all given tags, oldest
 * first, a page at a time (keyset on created_at, id), so a listing of any length is sent as
 * it is read rather than built whole.
 */
export async function* listInstances(
  s: Services,
  tenantId: string,
  filter: ListFilter,
): AsyncGenerator<Instance[]> {
  // The cursor keeps created_at as Postgres has it (microseconds; a Date has milliseconds).
  let after: { at: string; id: string } | undefined;
  for (;;) {
    const rows = await s.db
      .select({
        ...getTableColumns(instances),
        cursorAt: sql<string>`${instances.createdAt}::text`,
      })
      .from(instances)
      .where(
        and(
          eq(instances.tenantId, tenantId),
          filter.state ? eq(instances.state, filter.state) : undefined,
          filter.tags && Object.keys(filter.tags).length > 0
            ? sql`${instances.tags} @> ${JSON.stringify(filter.tags)}::jsonb`
            : undefined,
          after
            ? sql`(${instances.createdAt}, ${instances.id}) > (${after.at}::timestamptz, ${after.id})`
            : undefined,
        ),
      )
      .orderBy(asc(instances.createdAt), asc(instances.id))
      .limit(LIST_PAGE);
    if (rows.length > 0) yield rows.map(present);
    const last = rows.at(-1);
    if (!last || rows.length < LIST_PAGE) return;
    after = { at: last.cursorAt, id: last.id };
  }
}
