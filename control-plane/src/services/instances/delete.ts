import { eq } from "drizzle-orm";
import { events, hosts, instances } from "../../db/schema/index.ts";
import type { Services } from "../context.ts";
import { assertIdle } from "./lifecycle.ts";
import { lockInstance } from "./resolve.ts";

/**
 * DELETE /instances/{id}: allowed from any state (the only verb Unknown allows). On a
 * connected host the row goes once the host has deleted the instance; on a host that is
 * away the row goes now and the delete waits in `operations` for the host's return, so the
 * name is free at once and the host still cleans up.
 */
export async function deleteInstance(s: Services, tenantId: string, ref: string): Promise<void> {
  const { op, queued } = await s.db.transaction(async (tx) => {
    const row = await lockInstance(tx, tenantId, ref);
    await assertIdle(tx, row, "exclusive");
    const [host] = await tx.select().from(hosts).where(eq(hosts.id, row.hostId)).for("update");
    const away = host?.status !== "online";
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
    return { op, queued: away };
  });
  if (queued) {
    s.ops.send(op);
    return;
  }
  await s.ops.run(op, s.env.COMMAND_TIMEOUT_MS);
}
