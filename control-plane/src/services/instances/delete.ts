import type { CommandError } from "@offshoot/shared";
import { and, eq, inArray, or } from "drizzle-orm";
import { transaction } from "../../db/client.ts";
import { events, hosts, instances, operations } from "../../db/schema/index.ts";
import { type Call, newCall, type Services, topics } from "../context.ts";
import { strongestHold } from "../operations.ts";
import { assertIdle } from "./lifecycle.ts";
import { lockInstance } from "./resolve.ts";

const SUPERSEDED: CommandError = {
  code: "host_unavailable",
  message: "superseded by a delete while the host was away",
};

/**
 * DELETE /instances/{id}: allowed from any state (the only verb Unknown allows). On a
 * connected host the row goes once the host has deleted the instance. On a host that is
 * away the row goes now: operations still pending on the instance are failed (they could
 * only complete when the host returns, and would hold the instance until then), and the
 * delete waits in `operations` for the host's return, so the name is free at once and the
 * host still cleans up.
 */
export async function deleteInstance(
  s: Services,
  tenantId: string,
  ref: string,
  call: Call = newCall(s),
): Promise<void> {
  const { op, away, cancelled, id } = await transaction(s.db, async (tx) => {
    const row = await lockInstance(tx, tenantId, ref);
    const [host] = await tx
      .select({ status: hosts.status })
      .from(hosts)
      .where(eq(hosts.id, row.hostId));
    const away = host?.status !== "online";
    let cancelled: string[] = [];
    if (away) {
      const touching = or(
        eq(operations.instanceId, row.id),
        eq(operations.sourceInstanceId, row.id),
      );
      const flows = tx
        .select({ id: operations.id })
        .from(operations)
        .where(and(eq(operations.status, "pending"), touching));
      const failed = await tx
        .update(operations)
        .set({ status: "failed", error: SUPERSEDED, completedAt: new Date() })
        .where(
          and(eq(operations.status, "pending"), or(touching, inArray(operations.parentId, flows))),
        )
        .returning({ id: operations.id });
      cancelled = failed.map((f) => f.id);
    } else {
      assertIdle(row, "exclusive", await strongestHold(tx, row.id));
    }
    const op = await s.ops.insert(tx, {
      tenantId,
      hostId: row.hostId,
      instanceId: away ? null : row.id,
      lock: away ? "none" : "exclusive",
      payload: { kind: "delete", instance_id: row.id },
    });
    if (away) {
      await tx.delete(instances).where(eq(instances.id, row.id));
      await tx.insert(events).values({
        tenantId,
        instanceId: row.id,
        hostId: row.hostId,
        type: "instance.deleted",
        data: { operation: op.id, reason: "deleted while host away; host cleans up on return" },
      });
    }
    return { op, away, cancelled, id: row.id };
  });
  for (const id of cancelled) s.signals.notify(topics.operation(id));
  if (away) {
    s.signals.notify(topics.instance(id));
    s.ops.send(op);
    return;
  }
  await s.ops.run(op, call);
}
