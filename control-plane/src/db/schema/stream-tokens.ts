import { index, pgTable, text } from "drizzle-orm/pg-core";
import { ts } from "./columns.ts";
import { tenants } from "./tenants.ts";

// Short-lived, single-use tokens that open one exec or cp WebSocket in place of the API key (a
// browser cannot set the Authorization header on a WebSocket). Stored as SHA-256 hashes only.
export const streamTokens = pgTable(
  "stream_tokens",
  {
    tokenHash: text("token_hash").primaryKey(),
    tenantId: text("tenant_id")
      .notNull()
      .references(() => tenants.id, { onDelete: "cascade" }),
    expiresAt: ts("expires_at").notNull(),
  },
  (t) => [index("stream_tokens_expires_idx").on(t.expiresAt)],
);
