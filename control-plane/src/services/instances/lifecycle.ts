import {
  type Instance,
  type InstanceState,
  InvalidStateError,
  NotSupportedError,
  type Operation,
} from "@offshoot/shared";
import type { SQL } from "drizzle-orm";
import { issued, statement, type Tx, transactionEndingWith } from "../../db/client.ts";
import type { InstanceRow, OperationRow } from "../../db/schema/index.ts";
import { type Call, hostGrace, type Services } from "../context.ts";
import { freeAddress } from "../network.ts";
import { conflicts, insertOperations, newOperation, strongestHold } from "../operations.ts";
import {
  admitLocked,
  type HostRow,
  lockOnlineHost,
  type Need,
  overcommitOf,
  usage,
} from "../placement.ts";
import { nameInUse } from "./errors.ts";
import { present } from "./present.ts";
import { exactly, lockInstance, namesExactly, rowAfter } from "./resolve.ts";

/** Refuses when a pending operation (`held`, from strongestHold) holds the instance against
 * `want`. */
export function assertIdle(
  row: InstanceRow,
  want: "exclusive" | "shared",
  held: OperationRow | undefined,
) {
  if (conflicts(held, row.id, want)) {
    throw new InvalidStateError(
      `instance ${row.name} has a ${held.kind === "fork_flow" ? "fork" : held.kind} in progress (operation ${held.id}); retry when it finishes`,
    );
  }
}

export interface Checked {
  row: InstanceRow;
  /** strongestHold() of the row, asked after its lock. */
  held: OperationRow | undefined;
  /** Its host's row, locked; undefined when the host is not connected. */
  host: HostRow | undefined;
  /** The host's free address, asked after the host's lock (null: none, or not asked). */
  address: string | null;
  /** What the host's instances use, asked after the host's lock (undefined: not asked). */
  used: Need | undefined;
  /** Whether the tenant has an instance named `ask.name` (false: not asked). */
  nameTaken: boolean;
}

/**
 * Locks the row `ref` names and asks, in the same round trip and in this order, what a command
 * on it must check: the operations pending on it, its host (locked), and if asked the host's
 * free address and what its instances use ("others": all but this one). The questions go out
 * behind the lock on the transaction's connection, so they read whatever committed before the
 * lock was granted; they name the row as exactly() does. For a row found by id prefix instead
 * they are asked again, of that row.
 */
export async function lockChecked(
  tx: Tx,
  graceMs: number | null,
  tenantId: string,
  ref: string,
  ask: { address?: boolean; usage?: "all" | "others"; name?: string } = {},
): Promise<Checked> {
  const questions = (id: string | SQL, hostId: string | SQL) =>
    Promise.all([
      strongestHold(tx, id),
      lockOnlineHost(tx, graceMs, hostId),
      ask.address ? freeAddress(tx, hostId) : null,
      ask.usage ? usage(tx, hostId, ask.usage === "others" ? id : undefined) : undefined,
    ]);
  const [row, answers, nameTaken] = await Promise.all([
    lockInstance(tx, tenantId, ref),
    questions(exactly(tenantId, ref, "id"), exactly(tenantId, ref, "host_id")),
    ask.name === undefined ? false : nameInUse(tx, tenantId, ask.name),
  ]);
  const [held, host, address, used] = namesExactly(row, ref)
    ? answers
    : await questions(row.id, row.hostId);
  return { row, held, host, address, used, nameTaken };
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
  call: Call,
  verb: Verb,
): Promise<Instance> {
  const op = await transactionEndingWith(s.db, async (tx) => {
    const { row, held, host, used } = await lockChecked(tx, hostGrace(s), tenantId, ref, {
      ...(verb.resident && { usage: "others" }),
    });
    assertState(row, verb.name, verb.from);
    assertIdle(row, "exclusive", held);
    const need = verb.resident
      ? { vcpus: row.vcpus, memoryBytes: row.memoryBytes + row.hotplugBytes }
      : undefined;
    const admitted = await admitLocked(
      tx,
      host,
      row.hostId,
      need,
      overcommitOf(s.env),
      row.id,
      used,
    );
    verb.check?.(admitted, row);
    const op = newOperation({
      tenantId,
      hostId: row.hostId,
      instanceId: row.id,
      lock: "exclusive",
      payload: verb.operation(row),
    });
    // The operation's row goes out with the COMMIT.
    return { value: op, last: [issued(statement(tx, insertOperations([op])))] };
  });
  await s.ops.run(op, call);
  return present(await rowAfter(s, tenantId, op.id, op.instanceId ?? ""));
}

export function requireStandby(host: HostRow) {
  if (!host.capabilities?.standby) {
    throw new NotSupportedError(`host ${host.name} (${host.driver}) does not support standby`);
  }
}
