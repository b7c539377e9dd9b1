import { index, pgTable, text } from "drizzle-orm/pg-core";
import { createdAt, id, ts } from "./columns.ts";
import { tenants } from "./tenants.ts";

// Keys are stored as SHA-256 hashes only; `prefix` lets an admin tell keys apart.
export const apiKeys = pgTable(
  "api_keys",
  {
    id: id(),
    tenantId: text("tenant_id")
      .notNull()
      .references(() => tenants.id, { onDelete: "cascade" }),
    keyHash: text("key_hash").notNull().unique(),
    prefix: text("prefix").notNull(),
    name: text("name"),
    createdAt: createdAt(),
    revokedAt: ts("revoked_at"),
  },
  (t) => [index("api_keys_tenant_idx").on(t.tenantId)],
);
