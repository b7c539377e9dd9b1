import { CreateInstanceRequest, type Image, type Instance, InstanceState } from "@offshoot/shared";
import { useEffect, useState } from "preact/hooks";
import { InstanceActions, NameField, nameProblem } from "../actions.tsx";
import { api } from "../api.ts";
import { type LiveInstances, useLive } from "../live.ts";
import type { HostNames } from "../main.tsx";
import {
  Dialog,
  DialogButtons,
  ErrorNote,
  pairs,
  StatePill,
  tagText,
  useAction,
  when,
} from "../ui.tsx";

export function InstancesPage(props: { live: LiveInstances; hosts: HostNames }) {
  const live = useLive(props.live);
  const [state, setState] = useState("");
  const [tagQuery, setTagQuery] = useState("");
  const [creating, setCreating] = useState(false);
  let tagFilter: Record<string, string> = {};
  let tagError: string | undefined;
  try {
    tagFilter = pairs(tagQuery, "tag");
  } catch (e) {
    tagError = (e as Error).message;
  }
  const rows = [...live.instances.values()]
    .filter((i) => !state || i.state === state)
    .filter((i) => Object.entries(tagFilter).every(([k, v]) => i.tags?.[k] === v))
    .sort((a, b) => a.name.localeCompare(b.name));
  return (
    <section aria-labelledby="page-title">
      <div class="page-head">
        <h1 id="page-title" tabIndex={-1}>
          Instances
        </h1>
        <button type="button" class="primary" onClick={() => setCreating(true)}>
          Create instance
        </button>
      </div>
      <p class="live" role="status">
        {live.status === "live"
          ? `Live · ${live.instances.size} instance${live.instances.size === 1 ? "" : "s"}`
          : live.status === "connecting"
            ? "Connecting…"
            : `Reconnecting… ${live.error ?? ""}`}
      </p>
      <div class="filters">
        <label>
          State{" "}
          <select value={state} onChange={(e) => setState(e.currentTarget.value)}>
            <option value="">All</option>
            {InstanceState.options.map((s) => (
              <option key={s} value={s}>
                {s}
              </option>
            ))}
          </select>
        </label>
        <label>
          Tags{" "}
          <input
            placeholder="team=web, env=dev"
            value={tagQuery}
            aria-invalid={tagError ? true : undefined}
            aria-describedby={tagError ? "tag-error" : undefined}
            onInput={(e) => setTagQuery(e.currentTarget.value)}
          />
        </label>
        {tagError && (
          <span id="tag-error" class="hint invalid">
            {tagError}
          </span>
        )}
      </div>
      {rows.length === 0 ? (
        <p class="empty">
          {live.instances.size === 0 ? "No instances yet." : "No instance matches the filters."}
        </p>
      ) : (
        <div class="table-wrap">
          <table class="instances">
            <caption class="sr-only">Instances, by name</caption>
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">State</th>
                <th scope="col">Image</th>
                <th scope="col">Host</th>
                <th scope="col">IP</th>
                <th scope="col">vCPUs</th>
                <th scope="col">Size</th>
                <th scope="col">Created</th>
                <th scope="col">Started</th>
                <th scope="col">Tags</th>
                <th scope="col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {rows.map((i) => (
                <Row key={i.id} i={i} live={props.live} hosts={props.hosts} />
              ))}
            </tbody>
          </table>
        </div>
      )}
      {creating && <CreateDialog live={props.live} onClose={() => setCreating(false)} />}
    </section>
  );
}

function Row(props: { i: Instance; live: LiveInstances; hosts: HostNames }) {
  const { i } = props;
  const parent = i.forked_from ? props.live.instances.get(i.forked_from) : undefined;
  return (
    <tr data-instance={i.name}>
      <th scope="row" data-label="Name">
        <a href={`#/instances/${encodeURIComponent(i.id)}`}>{i.name}</a>
        {i.forked_from && (
          <span class="lineage">
            forked from{" "}
            {parent ? parent.name : <span title={i.forked_from}>a deleted instance</span>}
          </span>
        )}
      </th>
      <td data-label="State">
        <StatePill state={i.state} />
      </td>
      <td data-label="Image" class="mono">
        {i.image}
      </td>
      <td data-label="Host">{(i.host_id && props.hosts.get(i.host_id)) ?? "—"}</td>
      <td data-label="IP" class="mono">
        {i.network?.ip ?? "—"}
      </td>
      <td data-label="vCPUs">{i.vcpus ?? "—"}</td>
      <td data-label="Size">{i.size ?? "—"}</td>
      <td data-label="Created">{when(i.created_at)}</td>
      <td data-label="Started">{when(i.started_at)}</td>
      <td data-label="Tags">{tagText(i.tags) || "—"}</td>
      <td data-label="Actions">
        <InstanceActions instance={i} live={props.live} compact />
      </td>
    </tr>
  );
}

function CreateDialog(props: { live: LiveInstances; onClose: () => void }) {
  const [images, setImages] = useState<Image[] | null>(null);
  const [form, setForm] = useState({ name: "", image: "", size: "", vcpus: "", env: "", tags: "" });
  const [touched, setTouched] = useState(false);
  const action = useAction();
  useEffect(() => {
    api.get<Image[]>("/images").then(
      (all) => {
        const ready = all.filter((i) => i.status === "ready");
        setImages(ready);
        setForm((f) => (f.image || !ready[0] ? f : { ...f, image: ready[0].name }));
      },
      (e) => action.setError(e),
    );
  }, []);
  const set = (k: keyof typeof form) => (e: { currentTarget: { value: string } }) =>
    setForm({ ...form, [k]: e.currentTarget.value });
  const problem = nameProblem(form.name);
  return (
    <Dialog title="Create instance" onClose={props.onClose}>
      <form
        onSubmit={async (e) => {
          e.preventDefault();
          setTouched(true);
          if (problem) return;
          const ok = await action.run(async () => {
            const body = {
              name: form.name,
              image: form.image,
              ...(form.size.trim() && { size: form.size.trim() }),
              ...(form.vcpus && { vcpus: Number(form.vcpus) }),
              ...(form.env.trim() && { env: pairs(form.env, "variable") }),
              ...(form.tags.trim() && { tags: pairs(form.tags, "tag") }),
            };
            // The API's own rules first: a clear message before anything is sent.
            const checked = CreateInstanceRequest.safeParse(body);
            if (!checked.success) {
              const issue = checked.error.issues[0];
              throw new Error(`${issue?.path.join(".") || "request"}: ${issue?.message}`);
            }
            props.live.put(await api.post<Instance>("/instances", body));
          });
          if (ok) props.onClose();
        }}
      >
        <NameField
          id="create-name"
          label="Name"
          value={form.name}
          checked={touched}
          onInput={(name) => {
            setForm({ ...form, name });
            setTouched(true);
          }}
        />
        <label for="create-image">Image</label>
        {images && images.length > 0 ? (
          <select id="create-image" value={form.image} onChange={set("image")}>
            {images.map((i) => (
              <option key={i.name} value={i.name}>
                {i.name}
              </option>
            ))}
          </select>
        ) : (
          <input
            id="create-image"
            required
            placeholder={images ? "no ready image: pull one on the Images page" : "loading…"}
            value={form.image}
            onInput={set("image")}
          />
        )}
        <div class="two">
          <div>
            <label for="create-size">Memory</label>
            <input id="create-size" placeholder="1GB" value={form.size} onInput={set("size")} />
          </div>
          <div>
            <label for="create-vcpus">vCPUs</label>
            <input
              id="create-vcpus"
              type="number"
              min={1}
              max={256}
              placeholder="2"
              value={form.vcpus}
              onInput={set("vcpus")}
            />
          </div>
        </div>
        <label for="create-env">Environment (KEY=value, one per line)</label>
        <textarea id="create-env" rows={3} value={form.env} onInput={set("env")} />
        <label for="create-tags">Tags (key=value, one per line)</label>
        <textarea id="create-tags" rows={2} value={form.tags} onInput={set("tags")} />
        <ErrorNote error={action.error} />
        <DialogButtons
          onCancel={props.onClose}
          busy={action.busy}
          label="Create"
          busyLabel="Creating…"
        />
      </form>
    </Dialog>
  );
}
