import type { InstanceState, VolumeMount } from "@offshoot/shared";
import { sql } from "drizzle-orm";
import {
  bigint,
  boolean,
  index,
  integer,
  jsonb,
  pgTable,
  text,
  uniqueIndex,
} from "drizzle-orm/pg-core";
import { createdAt, ts } from "./columns.ts";
import { hosts } from "./hosts.ts";
import { images } from "./images.ts";
import { tenants } from "./tenants.ts";

export const instances = pgTable(
  "instances",
  {
    id: text("id").primaryKey(),
    tenantId: text("tenant_id")
      .notNull()
      .references(() => tenants.id, { onDelete: "cascade" }),
    hostId: text("host_id")
      .notNull()
      .references(() => hosts.id),
    name: text("name").notNull(),
    image: text("image").notNull(),
    /** The tenant's pulled image's digest when the instance was created from one (null: an
     * image its host imported, found by name). */
    imageDigest: text("image_digest"),
    /** The tenant's image it was created from (DELETE /images refuses while one is held). */
    imageId: text("image_id").references(() => images.id),
    hypervisor: text("hypervisor").notNull(),
    state: text("state").$type<InstanceState>().notNull(),
    stateError: text("state_error"),
    vcpus: integer("vcpus").notNull(),
    memoryBytes: bigint("memory_bytes", { mode: "number" }).notNull(),
    /** What the guest's memory really costs its host, when its host says it shares memory (a
     * fork mapping a shared base: its private pages); null: its size. Placement counts this. */
    memoryChargeBytes: bigint("memory_charge_bytes", { mode: "number" }),
    hotplugBytes: bigint("hotplug_bytes", { mode: "number" }).notNull().default(0),
    overlayBytes: bigint("overlay_bytes", { mode: "number" }).notNull(),
    diskIoBps: bigint("disk_io_bps", { mode: "number" }),
    env: jsonb("env").$type<Record<string, string>>().notNull().default({}),
    tags: jsonb("tags").$type<Record<string, string>>().notNull().default({}),
    entrypoint: jsonb("entrypoint").$type<string[]>(),
    cmd: jsonb("cmd").$type<string[]>(),
    networkEnabled: boolean("network_enabled").notNull(),
    /** Created with skip_guest_agent: no exec, cp or stat. */
    skipGuestAgent: boolean("skip_guest_agent").notNull().default(false),
    ip: text("ip"),
    mac: text("mac"),
    bandwidthDownloadBps: bigint("bandwidth_download_bps", { mode: "number" }),
    bandwidthUploadBps: bigint("bandwidth_upload_bps", { mode: "number" }),
    volumes: jsonb("volumes").$type<VolumeMount[]>().notNull().default([]),
    hasSnapshot: boolean("has_snapshot").notNull().default(false),
    exitCode: integer("exit_code"),
    exitMessage: text("exit_message"),
    forkedFrom: text("forked_from"),
    createdAt: createdAt(),
    startedAt: ts("started_at"),
    stoppedAt: ts("stopped_at"),
    updatedAt: ts("updated_at").notNull().defaultNow(),
  },
  (t) => [
    uniqueIndex("instances_tenant_name_uq").on(t.tenantId, t.name),
    uniqueIndex("instances_host_ip_uq").on(t.hostId, t.ip).where(sql`${t.ip} is not null`),
    uniqueIndex("instances_mac_uq").on(t.mac).where(sql`${t.mac} is not null`),
    index("instances_host_idx").on(t.hostId),
    // `{id}` may be an id prefix: LIKE 'prefix%' needs pattern ops to use an index.
    index("instances_id_prefix_idx").using("btree", t.id.op("text_pattern_ops")),
    index("instances_tenant_state_idx").on(t.tenantId, t.state),
  ],
);
export type InstanceRow = typeof instances.$inferSelect;
