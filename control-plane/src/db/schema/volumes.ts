import {
  bigint,
  customType,
  integer,
  jsonb,
  pgTable,
  primaryKey,
  text,
  uniqueIndex,
} from "drizzle-orm/pg-core";
import { createdAt } from "./columns.ts";
import { hosts } from "./hosts.ts";
import { tenants } from "./tenants.ts";

/**
 * A tenant's volume: an ext4 file on one host (`key` names it there), attached to instances
 * of that host by their `volumes` (which name it by `id`). `id` is the tenant's own (chosen or
 * generated), unique within the tenant.
 */
export const volumes = pgTable(
  "volumes",
  {
    key: text("key").primaryKey(),
    tenantId: text("tenant_id")
      .notNull()
      .references(() => tenants.id, { onDelete: "cascade" }),
    id: text("id").notNull(),
    name: text("name").notNull(),
    sizeBytes: bigint("size_bytes", { mode: "number" }).notNull(),
    tags: jsonb("tags").$type<Record<string, string>>().notNull().default({}),
    hostId: text("host_id")
      .notNull()
      .references(() => hosts.id),
    createdAt: createdAt(),
  },
  (t) => [uniqueIndex("volumes_tenant_id_uq").on(t.tenantId, t.id)],
);
export type VolumeRow = typeof volumes.$inferSelect;

const bytea = customType<{ data: Buffer; driverData: Buffer }>({ dataType: () => "bytea" });

/** An archive uploaded for POST /volumes/from-archive, held until its host has unpacked it into
 * the new volume (then deleted): chunks of at most ARCHIVE_CHUNK_BYTES, in order. */
export const volumeArchives = pgTable(
  "volume_archive_chunks",
  {
    archiveId: text("archive_id").notNull(),
    seq: integer("seq").notNull(),
    data: bytea("data").notNull(),
  },
  (t) => [primaryKey({ columns: [t.archiveId, t.seq] })],
);
