// heartbeat: the host is alive. Recorded in batches (one UPDATE for many hosts) where the
// transport can gather them.
import { CLOSE } from "@offshoot/shared";
import { asc, inArray } from "drizzle-orm";
import { now, transaction } from "../../db/client.ts";
import { hosts } from "../../db/schema/index.ts";
import type { Services } from "../context.ts";

/**
 * Heartbeats are folded into one UPDATE per flush, whatever the number of hosts (rows locked
 * in id order, as everywhere). Returns the hosts that were marked offline meanwhile: their
 * agents must say hello again before their instances can be trusted.
 */
export async function recordHeartbeats(s: Services, hostIds: string[]): Promise<string[]> {
  if (hostIds.length === 0) return [];
  const rows = await transaction(s.db, async (tx) => {
    const locked = await tx
      .select({ id: hosts.id, status: hosts.status })
      .from(hosts)
      .where(inArray(hosts.id, hostIds))
      .orderBy(asc(hosts.id))
      .for("update");
    await tx.update(hosts).set({ lastSeenAt: now }).where(inArray(hosts.id, hostIds));
    return locked;
  });
  return rows.filter((r) => r.status !== "online").map((r) => r.id);
}

/**
 * Records heartbeats and asks each host that was marked offline meanwhile (a stall longer than
 * the grace period) to reconnect: its instances are Unknown until a hello reconciles them.
 */
export async function heartbeatsReceived(
  s: Services,
  hostIds: string[],
  close: (hostId: string, code: number, reason: string) => void,
): Promise<void> {
  for (const id of await recordHeartbeats(s, hostIds)) {
    close(id, CLOSE.resync, "host was marked offline");
  }
}
