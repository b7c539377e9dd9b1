// What an interrupted operation leaves to undo after an agent crash — the same rule for every
// driver; each supplies the primitives.
import { isHostOperation, type ObservedInstance, type Operation } from "@offshoot/shared";

export interface RollbackPrimitives {
  get(id: string): Promise<ObservedInstance | null>;
  /** Whether the instance's record was made by `commandId` (or there is none yet). */
  ownedBy(id: string, commandId: string): Promise<boolean>;
  /** Removes a half-made instance and everything it has on the host. */
  discard(id: string): Promise<void>;
  /** Finishes an interrupted delete. */
  remove(id: string): Promise<void>;
  /** Makes the record say what the host actually shows. */
  converge(id: string): Promise<void>;
  /** Removes a half-made snapshot if this command made it. */
  discardSnapshot(id: string, commandId: string): Promise<void>;
  /** Settles an interrupted snapshot restore: the instance's old files or its new ones, whole. */
  settleRestore(id: string): Promise<void>;
}

/**
 * A create or fork target goes only if this command made it — a fork that lost the id race
 * must not remove the instance that won it; a delete is finished; anything else converges.
 * Resolves the involved instances as observed afterwards.
 */
export async function rollbackOperation(
  op: Operation,
  commandId: string,
  d: RollbackPrimitives,
): Promise<ObservedInstance[]> {
  // The host's own commands touch no instance: nothing of an instance to undo.
  if (isHostOperation(op)) return [];
  const discardIfOwn = async (id: string) => {
    if (await d.ownedBy(id, commandId)) await d.discard(id);
  };
  const observe = async (ids: string[]) =>
    (await Promise.all(ids.map((id) => d.get(id)))).filter(
      (i): i is ObservedInstance => i !== null,
    );
  switch (op.kind) {
    case "create":
      await discardIfOwn(op.instance.id);
      return observe([op.instance.id]);
    case "fork":
      await discardIfOwn(op.target.id);
      await d.converge(op.source_id);
      return observe([op.source_id, op.target.id]);
    case "delete":
      await d.remove(op.instance_id);
      return [];
    case "snapshot_create":
      await d.discardSnapshot(op.snapshot_id, commandId);
      await d.converge(op.instance_id);
      return observe([op.instance_id]);
    case "snapshot_restore":
      await d.settleRestore(op.instance_id);
      await d.converge(op.instance_id);
      return observe([op.instance_id]);
    default:
      await d.converge(op.instance_id);
      return observe([op.instance_id]);
  }
}
