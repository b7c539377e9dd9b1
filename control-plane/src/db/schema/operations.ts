import type {
  CommandError,
  ForkFlowPayload,
  ObservedInstance,
  Operation,
  OperationKind,
} from "@offshoot/shared";
import { sql } from "drizzle-orm";
import { index, jsonb, pgTable, text, uniqueIndex } from "drizzle-orm/pg-core";
import { createdAt, ts } from "./columns.ts";

/**
 * Durable command records. A host command is written here before it is sent and re-sent
 * (same id) until its result is recorded. A `fork` flow is a parent row whose children are
 * the host commands it issued; it can be resumed after a control-plane restart.
 */
export const operations = pgTable(
  "operations",
  {
    id: text("id").primaryKey(),
    tenantId: text("tenant_id"),
    hostId: text("host_id").notNull(),
    parentId: text("parent_id"),
    /** For a flow's steps: which step this is ("standby", "fork", "restore", "restore#2"…). */
    step: text("step"),
    /** Instance the operation changes; for forks, the new instance. */
    instanceId: text("instance_id"),
    /** For forks: the source, which must not change while the fork reads it. */
    sourceInstanceId: text("source_instance_id"),
    kind: text("kind").$type<OperationKind | ForkFlowPayload["kind"]>().notNull(),
    /** exclusive: no other operation on the instance; shared: only other shared ones. */
    lock: text("lock", { enum: ["exclusive", "shared", "none"] }).notNull(),
    status: text("status", { enum: ["pending", "succeeded", "failed"] })
      .notNull()
      .default("pending"),
    payload: jsonb("payload").$type<Operation | ForkFlowPayload>().notNull(),
    observed: jsonb("observed").$type<ObservedInstance[]>(),
    error: jsonb("error").$type<CommandError>(),
    createdAt: createdAt(),
    completedAt: ts("completed_at"),
  },
  (t) => [
    index("operations_pending_host_idx")
      .on(t.hostId, t.createdAt)
      .where(sql`${t.status} = 'pending'`),
    index("operations_pending_instance_idx").on(t.instanceId).where(sql`${t.status} = 'pending'`),
    index("operations_pending_source_idx")
      .on(t.sourceInstanceId)
      .where(sql`${t.status} = 'pending'`),
    // A fork flow issues each step once, even if two drivers resume it at once.
    uniqueIndex("operations_parent_step_uq")
      .on(t.parentId, t.step)
      .where(sql`${t.parentId} is not null`),
  ],
);
export type OperationRow = typeof operations.$inferSelect;
