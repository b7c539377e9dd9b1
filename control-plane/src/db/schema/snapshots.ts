import { sql } from "drizzle-orm";
import { bigint, index, jsonb, pgTable, text, uniqueIndex } from "drizzle-orm/pg-core";
import { createdAt } from "./columns.ts";
import { hosts } from "./hosts.ts";
import type { InstanceRow } from "./instances.ts";
import { tenants } from "./tenants.ts";

/**
 * A tenant's snapshot: files on its source's host (forks from it are placed there). `source`
 * is the source instance's row as it was at capture, so forks inherit its settings after the
 * source has changed or gone. `status`: creating (its capture is pending; not listed), ready,
 * deleting (its host has not confirmed the delete yet; not listed).
 */
export const snapshots = pgTable(
  "snapshots",
  {
    id: text("id").primaryKey(),
    tenantId: text("tenant_id")
      .notNull()
      .references(() => tenants.id, { onDelete: "cascade" }),
    hostId: text("host_id")
      .notNull()
      .references(() => hosts.id),
    name: text("name"),
    kind: text("kind", { enum: ["Standby", "Stopped"] }).notNull(),
    tags: jsonb("tags").$type<Record<string, string>>().notNull().default({}),
    sourceInstanceId: text("source_instance_id").notNull(),
    sourceInstanceName: text("source_instance_name").notNull(),
    sourceHypervisor: text("source_hypervisor").notNull(),
    source: jsonb("source").$type<InstanceRow>().notNull(),
    status: text("status", { enum: ["creating", "ready", "deleting"] })
      .notNull()
      .default("creating"),
    sizeBytes: bigint("size_bytes", { mode: "number" }).notNull().default(0),
    /** The capture's operation (its flow for a Running source). */
    operationId: text("operation_id"),
    createdAt: createdAt(),
  },
  (t) => [
    // Hypeman: a snapshot's name is unique per source instance.
    uniqueIndex("snapshots_source_name_uq")
      .on(t.tenantId, t.sourceInstanceId, t.name)
      .where(sql`${t.name} is not null`),
    index("snapshots_tenant_created_idx").on(t.tenantId, t.createdAt),
  ],
);
export type SnapshotRow = typeof snapshots.$inferSelect;
