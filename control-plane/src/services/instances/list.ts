import type { Instance, InstanceState, Tags } from "@offshoot/shared";
import { and, asc, eq, sql } from "drizzle-orm";
import { instances } from "../../db/schema/index.ts";
import type { Services } from "../context.ts";
import { present } from "./present.ts";

/** GET /instances: the tenant's instances, filtered by state and by all given tags. */
export async function listInstances(
  s: Services,
  tenantId: string,
  filter: { state?: InstanceState; tags?: Tags },
): Promise<Instance[]> {
  const rows = await s.db
    .select()
    .from(instances)
    .where(
      and(
        eq(instances.tenantId, tenantId),
        filter.state ? eq(instances.state, filter.state) : undefined,
        filter.tags && Object.keys(filter.tags).length > 0
          ? sql`${instances.tags} @> ${JSON.stringify(filter.tags)}::jsonb`
          : undefined,
      ),
    )
    .orderBy(asc(instances.createdAt), asc(instances.id));
  return rows.map(present);
}
