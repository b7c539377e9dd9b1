import {
  type Instance,
  type InstanceState,
  InvalidStateError,
  NotSupportedError,
  type Operation,
} from "@offshoot/shared";
import { type Tx, transaction } from "../../db/client.ts";
import type { InstanceRow, OperationRow } from "../../db/schema/index.ts";
import type { Services } from "../context.ts";
import { conflicts, strongestHold } from "../operations.ts";
import { admit, type HostRow } from "../placement.ts";
import { present } from "./present.ts";
import { lockInstance, rowAfter } from "./resolve.ts";

/** Refuses when a pending operation holds the instance against `want`. `held`: what
 * strongestHold() found, when the caller asked it already. */
export async function assertIdle(
  tx: Tx,
  row: InstanceRow,
  want: "exclusive" | "shared",
  held?: { op: OperationRow | undefined },
) {
  const busy = held ? held.op : await strongestHold(tx, row.id);
  if (conflicts(busy, row.id, want)) {
    throw new InvalidStateError(
      `instance ${row.name} has a ${busy.kind === "fork_flow" ? "fork" : busy.kind} in progress (operation ${busy.id}); retry when it finishes`,
    );
  }
}

export function assertState(row: InstanceRow, verb: string, from: readonly InstanceState[]) {
  if (!from.includes(row.state)) {
    throw new InvalidStateError(
      `cannot ${verb} instance ${row.name}: it is ${row.state}, and ${verb} needs ${from.join(" or ")}`,
    );
  }
}

interface Verb {
  name: string;
  from: readonly InstanceState[];
  /** Whether the instance will hold vCPUs and memory once the verb is done. */
  resident: boolean;
  check?: (host: HostRow, row: InstanceRow) => void;
  operation: (row: InstanceRow) => Operation;
}

/**
 * The shape shared by start/stop/standby/restore: lock the row, check its state and that no
 * other operation holds it, check the host, record the command — all in one transaction —
 * then send it and wait for the host's answer.
 */
export async function runVerb(
  s: Services,
  tenantId: string,
  ref: string,
  verb: Verb,
): Promise<Instance> {
  const op = await transaction(s.db, async (tx) => {
    const row = await lockInstance(tx, tenantId, ref);
    assertState(row, verb.name, verb.from);
    const need = verb.resident
      ? { vcpus: row.vcpus, memoryBytes: row.memoryBytes + row.hotplugBytes }
      : undefined;
    const [, host] = await Promise.all([
      assertIdle(tx, row, "exclusive"),
      admit(tx, s.env.HOST_GRACE_MS, row.hostId, need, row.id),
    ]);
    verb.check?.(host, row);
    return s.ops.insert(tx, {
      tenantId,
      hostId: row.hostId,
      instanceId: row.id,
      lock: "exclusive",
      payload: verb.operation(row),
    });
  });
  await s.ops.run(op, s.env.COMMAND_TIMEOUT_MS);
  return present(await rowAfter(s, tenantId, op.id, op.instanceId ?? ""));
}

export function requireStandby(host: HostRow) {
  if (!host.capabilities?.standby) {
    throw new NotSupportedError(`host ${host.name} (${host.driver}) does not support standby`);
  }
}
