import type { SnapshotCompression } from "@offshoot/shared";
import { sql } from "drizzle-orm";
import { bigint, boolean, index, jsonb, pgTable, text, uniqueIndex } from "drizzle-orm/pg-core";
import { createdAt, ts } from "./columns.ts";
import { hosts } from "./hosts.ts";
import { type InstanceRow, instances } from "./instances.ts";
import { tenants } from "./tenants.ts";

export interface ResolvedCompression {
  enabled: true;
  algorithm: SnapshotCompression;
  level: number;
}

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
    /** Taken by the instance's schedule: its retention applies. */
    scheduled: boolean("scheduled").notNull().default(false),
    /** How its memory is kept compressed (algorithm and level resolved), or null. */
    compression: jsonb("compression").$type<ResolvedCompression>(),
    /** none; compressing (its snapshot_compress is pending); compressed; error. */
    compressionState: text("compression_state", {
      enum: ["none", "compressing", "compressed", "error"],
    })
      .notNull()
      .default("none"),
    compressionError: text("compression_error"),
    compressedSizeBytes: bigint("compressed_size_bytes", { mode: "number" }),
    uncompressedSizeBytes: bigint("uncompressed_size_bytes", { mode: "number" }),
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

/**
 * An instance's snapshot schedule (at most one). `next_run_at` is claimed by one UPDATE that
 * moves it on (services/schedules.ts), so of any number of replicas and Worker crons exactly
 * one runs each due time; the run after an outage is the next one due, not every one missed.
 */
export const snapshotSchedules = pgTable(
  "snapshot_schedules",
  {
    /** The schedule goes with its instance. */
    instanceId: text("instance_id")
      .primaryKey()
      .references(() => instances.id, { onDelete: "cascade" }),
    tenantId: text("tenant_id")
      .notNull()
      .references(() => tenants.id, { onDelete: "cascade" }),
    /** As given (Go duration), and in milliseconds. */
    interval: text("interval").notNull(),
    intervalMs: bigint("interval_ms", { mode: "number" }).notNull(),
    namePrefix: text("name_prefix"),
    metadata: jsonb("metadata").$type<Record<string, string>>().notNull().default({}),
    maxCount: bigint("max_count", { mode: "number" }),
    maxAge: text("max_age"),
    maxAgeMs: bigint("max_age_ms", { mode: "number" }),
    nextRunAt: ts("next_run_at").notNull(),
    lastRunAt: ts("last_run_at"),
    lastSnapshotId: text("last_snapshot_id"),
    lastError: text("last_error"),
    createdAt: createdAt(),
    updatedAt: ts("updated_at").notNull(),
  },
  (t) => [index("snapshot_schedules_due_idx").on(t.nextRunAt)],
);
export type SnapshotScheduleRow = typeof snapshotSchedules.$inferSelect;
