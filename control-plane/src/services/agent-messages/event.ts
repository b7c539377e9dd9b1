// event: something the agent saw happen on its own (a guest exited, a state reached outside a
// command). Written onto the instance's row if that row is this host's.
import type { Event } from "@offshoot/shared";
import { transaction } from "../../db/client.ts";
import { type Services, topics } from "../context.ts";
import { applyObserved } from "../operations.ts";

export async function eventReceived(s: Services, hostId: string, event: Event): Promise<void> {
  const changed = await transaction(s.db, (tx) =>
    applyObserved(tx, hostId, [event.instance], "host.event"),
  );
  for (const id of changed) s.signals.notify(topics.instance(id));
}
