import type { Image } from "@offshoot/shared";
import { useState } from "preact/hooks";
import { api } from "../api.ts";
import { usePoll } from "../poll.ts";
import { bytes, ErrorNote, useAction, when } from "../ui.tsx";

const busy = (i: Image) => ["pending", "pulling", "converting"].includes(i.status);

export function ImagesPage() {
  const images = usePoll<Image[]>("/images", 2000);
  const [name, setName] = useState("");
  const action = useAction();
  return (
    <section aria-labelledby="page-title">
      <h1 id="page-title" tabIndex={-1}>
        Images
      </h1>
      <form
        class="inline"
        onSubmit={async (e) => {
          e.preventDefault();
          const ok = await action.run(() => api.post<Image>("/images", { name: name.trim() }));
          if (ok) {
            setName("");
            images.reload();
          }
        }}
      >
        <label>
          Pull an image{" "}
          <input
            value={name}
            required
            placeholder="registry.example/team/app:v1"
            onInput={(e) => setName(e.currentTarget.value)}
          />
        </label>
        <button type="submit" disabled={action.busy || !name.trim()}>
          Pull
        </button>
      </form>
      <ErrorNote error={images.error ?? action.error} />
      {images.value && images.value.length === 0 && <p class="empty">No images.</p>}
      {images.value && images.value.length > 0 && (
        <div class="table-wrap">
          <table>
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Status</th>
                <th scope="col">Size</th>
                <th scope="col">Digest</th>
                <th scope="col">Created</th>
              </tr>
            </thead>
            <tbody>
              {images.value.map((i) => (
                <tr key={i.name}>
                  <th scope="row" data-label="Name" class="mono">
                    {i.name}
                  </th>
                  <td data-label="Status">
                    <span class={`state image-${i.status}`}>{i.status}</span>
                    {busy(i) && (
                      <progress
                        aria-label={`${i.name} ${i.status}`}
                        {...(i.progress && i.progress.bytes_total > 0
                          ? { value: i.progress.bytes_done, max: i.progress.bytes_total }
                          : {})}
                      />
                    )}
                    {i.queue_position ? (
                      <span class="hint"> queued #{i.queue_position}</span>
                    ) : null}
                    {i.error && <span class="hint invalid"> {i.error}</span>}
                  </td>
                  <td data-label="Size">{bytes(i.size_bytes)}</td>
                  <td data-label="Digest" class="mono ellipsis" title={i.digest}>
                    {i.digest ? `${i.digest.slice(0, 19)}…` : "—"}
                  </td>
                  <td data-label="Created">{when(i.created_at)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
