import type { ForkTargetState, Instance, Snapshot } from "@offshoot/shared";
import { useState } from "preact/hooks";
import { Confirm, NameField, nameProblem, TargetStateField } from "../actions.tsx";
import { api, enc } from "../api.ts";
import type { LiveInstances } from "../live.ts";
import { usePoll } from "../poll.ts";
import { bytes, Dialog, DialogButtons, ErrorNote, useAction, when } from "../ui.tsx";

export function SnapshotsPage(props: { live: LiveInstances }) {
  const snaps = usePoll<Snapshot[]>("/snapshots", 3000);
  const [forking, setForking] = useState<Snapshot | null>(null);
  const [deleting, setDeleting] = useState<Snapshot | null>(null);
  const action = useAction();
  return (
    <section aria-labelledby="page-title">
      <h1 id="page-title" tabIndex={-1}>
        Snapshots
      </h1>
      <p class="hint">Take one from an instance's page; fork or delete them here.</p>
      <ErrorNote error={snaps.error ?? action.error} />
      {snaps.value?.length === 0 && <p class="empty">No snapshots yet.</p>}
      {snaps.value && snaps.value.length > 0 && (
        <div class="table-wrap">
          <table>
            <thead>
              <tr>
                <th scope="col">Snapshot</th>
                <th scope="col">Kind</th>
                <th scope="col">Source</th>
                <th scope="col">Size</th>
                <th scope="col">Compression</th>
                <th scope="col">Taken</th>
                <th scope="col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {snaps.value.map((s) => (
                <tr key={s.id}>
                  <th scope="row" data-label="Snapshot" class="mono">
                    {s.name ?? s.id}
                  </th>
                  <td data-label="Kind">{s.kind}</td>
                  <td data-label="Source">
                    <a href={`#/instances/${encodeURIComponent(s.source_instance_id)}`}>
                      {s.source_instance_name}
                    </a>
                  </td>
                  <td data-label="Size">{bytes(s.size_bytes)}</td>
                  <td data-label="Compression">
                    {s.compression_state ?? "none"}
                    {s.compression_state === "compressed" &&
                      ` (${bytes(s.compressed_size_bytes)} of ${bytes(s.uncompressed_size_bytes)})`}
                  </td>
                  <td data-label="Taken">{when(s.created_at)}</td>
                  <td data-label="Actions">
                    <div class="actions">
                      <button
                        type="button"
                        aria-label={`Fork snapshot ${s.name ?? s.id}`}
                        onClick={() => setForking(s)}
                      >
                        Fork
                      </button>
                      <button
                        type="button"
                        class="danger"
                        disabled={action.busy}
                        aria-label={`Delete snapshot ${s.name ?? s.id}`}
                        onClick={() => setDeleting(s)}
                      >
                        Delete
                      </button>
                    </div>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {deleting && (
        <Confirm
          title={`Delete snapshot ${deleting.name ?? deleting.id}`}
          text={`Delete snapshot ${deleting.name ?? deleting.id}? Instances forked from it keep running.`}
          verb="Delete"
          onClose={() => setDeleting(null)}
          onConfirm={() =>
            action.run(async () => {
              await api.del(`/snapshots/${enc(deleting.id)}`);
              snaps.reload();
            })
          }
        />
      )}
      {forking && (
        <ForkSnapshot snapshot={forking} live={props.live} onClose={() => setForking(null)} />
      )}
    </section>
  );
}

function ForkSnapshot(props: { snapshot: Snapshot; live: LiveInstances; onClose: () => void }) {
  const s = props.snapshot;
  const [name, setName] = useState(`${s.source_instance_name}-from-snap`.slice(0, 63));
  const [target, setTarget] = useState<"" | ForkTargetState>("");
  const action = useAction();
  const problem = nameProblem(name);
  return (
    <Dialog title={`Fork snapshot ${s.name ?? s.id}`} onClose={props.onClose}>
      <form
        onSubmit={async (e) => {
          e.preventDefault();
          if (problem) return;
          const ok = await action.run(async () => {
            const made = await api.post<Instance>(`/snapshots/${enc(s.id)}/fork`, {
              name,
              ...(target && { target_state: target }),
            });
            props.live.put(made);
            location.hash = `#/instances/${encodeURIComponent(made.id)}`;
          });
          if (ok) props.onClose();
        }}
      >
        <NameField
          id="snap-fork-name"
          label="Name of the new instance"
          value={name}
          checked
          onInput={setName}
        />
        <TargetStateField
          id="snap-fork-target"
          label="State of the new instance"
          source={`the snapshot (${s.kind})`}
          value={target}
          onChange={setTarget}
        />
        <ErrorNote error={action.error} />
        <DialogButtons onCancel={props.onClose} busy={action.busy} label="Fork" />
      </form>
    </Dialog>
  );
}
