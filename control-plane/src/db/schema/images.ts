import { bigint, index, jsonb, pgTable, text, uniqueIndex } from "drizzle-orm/pg-core";
import { createdAt, id, ts } from "./columns.ts";
import { hosts } from "./hosts.ts";
import { tenants } from "./tenants.ts";

export type ImageStatus = "pending" | "pulling" | "converting" | "ready" | "failed";

/**
 * A tenant's image: a reference it asked to pull (POST /images) and what the pull found. The
 * host that pulled keeps the layers and the rootfs by digest (hosts.image_digests); other
 * hosts pull the same digest when an instance is placed there. Credentials are never stored:
 * `credentials_hash` (salted) only tells whether a second request brought the same ones.
 */
export const images = pgTable(
  "images",
  {
    id: id(),
    tenantId: text("tenant_id")
      .notNull()
      .references(() => tenants.id, { onDelete: "cascade" }),
    /** Normalized reference ("docker.io/library/alpine:latest"). */
    name: text("name").notNull(),
    status: text("status").$type<ImageStatus>().notNull(),
    error: text("error"),
    /** "os/arch[/variant]" asked for (pending) or found (ready). */
    platform: text("platform").notNull(),
    digest: text("digest"),
    sizeBytes: bigint("size_bytes", { mode: "number" }),
    entrypoint: jsonb("entrypoint").$type<string[]>(),
    cmd: jsonb("cmd").$type<string[]>(),
    env: jsonb("env").$type<Record<string, string>>().notNull().default({}),
    workingDir: text("working_dir"),
    tags: jsonb("tags").$type<Record<string, string>>().notNull().default({}),
    /** The host running the pull (and, once ready, holding it). */
    hostId: text("host_id").references(() => hosts.id, { onDelete: "set null" }),
    /** The pull's operation: only its result or progress may write this row. */
    operationId: text("operation_id"),
    bytesDone: bigint("bytes_done", { mode: "number" }).notNull().default(0),
    bytesTotal: bigint("bytes_total", { mode: "number" }).notNull().default(0),
    credentialsHash: text("credentials_hash"),
    createdAt: createdAt(),
    /** When the current pull was asked for (queue order). */
    requestedAt: ts("requested_at").notNull().defaultNow(),
    updatedAt: ts("updated_at").notNull().defaultNow(),
  },
  (t) => [
    uniqueIndex("images_tenant_name_uq").on(t.tenantId, t.name),
    index("images_host_status_idx").on(t.hostId, t.status),
  ],
);
export type ImageRow = typeof images.$inferSelect;
