import { bigserial, index, jsonb, pgTable, text } from "drizzle-orm/pg-core";
import { createdAt } from "./columns.ts";

/** An audit trail of what happened to each instance (created, state changes, deleted); a
 * tenant's are streamed by GET /events, in id order. */
export const events = pgTable(
  "events",
  {
    id: bigserial("id", { mode: "number" }).primaryKey(),
    tenantId: text("tenant_id"),
    instanceId: text("instance_id"),
    hostId: text("host_id"),
    type: text("type").notNull(),
    data: jsonb("data").$type<Record<string, unknown>>().notNull().default({}),
    createdAt: createdAt(),
  },
  (t) => [
    index("events_instance_idx").on(t.instanceId, t.id),
    index("events_tenant_idx").on(t.tenantId, t.id),
  ],
);
