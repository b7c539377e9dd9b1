import type { DriverCapabilities, ImageInfo } from "@offshoot/shared";
import { bigint, cidr, integer, jsonb, pgTable, text } from "drizzle-orm/pg-core";
import { createdAt, id, ts } from "./columns.ts";

// Hosts are shared by all tenants; the agent authenticates with a token stored hashed.
export const hosts = pgTable("hosts", {
  id: id(),
  name: text("name").notNull().unique(),
  tokenHash: text("token_hash").notNull().unique(),
  /** The host's guest subnet (services/network.ts): no two hosts' overlap (an exclusion
   * constraint in migration 0003, which drizzle does not model). */
  subnet: cidr("subnet").notNull(),
  status: text("status", { enum: ["online", "offline"] })
    .notNull()
    .default("offline"),
  driver: text("driver"),
  agentVersion: text("agent_version"),
  capabilities: jsonb("capabilities").$type<DriverCapabilities>(),
  /** What the host reported in its last hello: the images it can boot. */
  images: jsonb("images").$type<ImageInfo[]>().notNull().default([]),
  /** Digests of the pulled images the host holds (hello, then each pull it finishes). */
  imageDigests: jsonb("image_digests").$type<string[]>().notNull().default([]),
  vcpus: integer("vcpus").notNull().default(0),
  memoryBytes: bigint("memory_bytes", { mode: "number" }).notNull().default(0),
  lastSeenAt: ts("last_seen_at"),
  /** The host's MemAvailable as its last memory report said (agent MemoryReport), and when. */
  memoryAvailableBytes: bigint("memory_available_bytes", { mode: "number" }),
  memoryReportedAt: ts("memory_reported_at"),
  connectedAt: ts("connected_at"),
  createdAt: createdAt(),
});
