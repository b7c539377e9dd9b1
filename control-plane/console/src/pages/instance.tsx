import type { Instance, Snapshot, SnapshotKind } from "@offshoot/shared";
import { useEffect, useRef, useState } from "preact/hooks";
import { InstanceActions } from "../actions.tsx";
import { api, enc, readSse } from "../api.ts";
import { Files } from "../files.tsx";
import { type LiveInstances, useLive } from "../live.ts";
import type { HostNames } from "../main.tsx";
import { Terminal } from "../terminal.tsx";
import { ErrorNote, messageOf, StatePill, useAction } from "../ui.tsx";

export function InstancePage(props: { id: string; live: LiveInstances; hosts: HostNames }) {
  const live = useLive(props.live);
  const known = live.instances.get(props.id);
  const [fetched, setFetched] = useState<Instance | null>(null);
  const [error, setError] = useState<unknown>(null);
  useEffect(() => {
    if (known) return;
    api.get<Instance>(`/instances/${enc(props.id)}`).then(setFetched, setError);
  }, [props.id, Boolean(known)]);
  const i = known ?? fetched;
  if (!i) {
    return (
      <section>
        <h1 tabIndex={-1}>Instance</h1>
        {error ? <ErrorNote error={error} /> : <p>Loading…</p>}
        <p>
          <a href="#/instances">All instances</a>
        </p>
      </section>
    );
  }
  return (
    <section aria-labelledby="page-title">
      <p class="crumbs">
        <a href="#/instances">Instances</a> /
      </p>
      <div class="page-head">
        <h1 id="page-title" tabIndex={-1}>
          {i.name}
        </h1>
        <StatePill state={i.state} />
      </div>
      <InstanceActions
        instance={i}
        live={props.live}
        onDeleted={() => (location.hash = "#/instances")}
      />
      <div class="columns">
        <Fields i={i} hosts={props.hosts} />
        <Lineage i={i} live={props.live} />
      </div>
      <Logs i={i} />
      <section aria-labelledby="terminal-title">
        <h2 id="terminal-title">Terminal</h2>
        {i.state === "Running" ? (
          <Terminal instance={i.id} />
        ) : (
          <p class="hint">The guest must be Running to open a terminal.</p>
        )}
      </section>
      <section aria-labelledby="files-title">
        <h2 id="files-title">Files</h2>
        {i.state === "Running" ? (
          <Files instance={i.id} />
        ) : (
          <p class="hint">The guest must be Running to copy files.</p>
        )}
      </section>
      <SnapshotForm i={i} />
    </section>
  );
}

function Fields(props: { i: Instance; hosts: HostNames }) {
  const entries = Object.entries(props.i) as Array<[string, unknown]>;
  const show = (k: string, v: unknown) => {
    if (k === "host_id" && typeof v === "string") return `${props.hosts.get(v) ?? v} (${v})`;
    if (v === null || v === undefined) return "—";
    if (typeof v === "object") return JSON.stringify(v, null, 1);
    return String(v);
  };
  return (
    <section aria-labelledby="fields-title">
      <h2 id="fields-title">Details</h2>
      <dl class="fields">
        {entries.map(([k, v]) => (
          <div key={k}>
            <dt>{k}</dt>
            <dd class={typeof v === "object" && v !== null ? "mono pre" : "mono"}>{show(k, v)}</dd>
          </div>
        ))}
      </dl>
    </section>
  );
}

/** The instance's family: from its oldest known ancestor down, every fork and its forks. */
function Lineage(props: { i: Instance; live: LiveInstances }) {
  const all = props.live.instances;
  const children = new Map<string, Instance[]>();
  for (const x of all.values()) {
    if (!x.forked_from) continue;
    const list = children.get(x.forked_from) ?? [];
    list.push(x);
    children.set(x.forked_from, list);
  }
  let root = props.i;
  const seen = new Set([root.id]);
  for (
    let up = all.get(root.forked_from ?? "");
    up && !seen.has(up.id);
    up = all.get(up.forked_from ?? "")
  ) {
    seen.add(up.id);
    root = up;
  }
  const node = (x: Instance, depth: number) => (
    <li key={x.id}>
      {x.id === props.i.id ? (
        <strong aria-current="true">{x.name}</strong>
      ) : (
        <a href={`#/instances/${encodeURIComponent(x.id)}`}>{x.name}</a>
      )}{" "}
      <StatePill state={x.state} />
      {depth < 32 && (children.get(x.id)?.length ?? 0) > 0 && (
        <ul>
          {(children.get(x.id) ?? [])
            .sort((a, b) => a.created_at.localeCompare(b.created_at))
            .map((c) => node(c, depth + 1))}
        </ul>
      )}
    </li>
  );
  const orphaned = root.forked_from && !all.has(root.forked_from);
  return (
    <section aria-labelledby="lineage-title">
      <h2 id="lineage-title">Lineage</h2>
      {props.i.forked_from && (
        <p>
          Forked from{" "}
          {all.get(props.i.forked_from) ? (
            <a href={`#/instances/${encodeURIComponent(props.i.forked_from)}`}>
              {all.get(props.i.forked_from)?.name}
            </a>
          ) : (
            `${props.i.forked_from} (deleted)`
          )}
        </p>
      )}
      {orphaned && <p class="hint">The family's first instance has been deleted.</p>}
      <ul class="tree">{node(root, 0)}</ul>
    </section>
  );
}

type LogSource = "app" | "vmm" | "hypeman";
/** Lines kept on screen; older ones scroll away. */
const LOG_LINES = 2000;

function Logs(props: { i: Instance }) {
  const [source, setSource] = useState<LogSource>("app");
  const [lines, setLines] = useState<string[]>([]);
  const [status, setStatus] = useState("");
  const box = useRef<HTMLPreElement>(null);
  useEffect(() => {
    const abort = new AbortController();
    setLines([]);
    setStatus("Following…");
    const pending: string[] = [];
    let timer: ReturnType<typeof setTimeout> | undefined;
    const flush = () => {
      timer = undefined;
      const add = pending.splice(0);
      setLines((old) => [...old, ...add].slice(-LOG_LINES));
    };
    readSse(
      `/instances/${enc(props.i.id)}/logs?follow=true&tail=200&source=${source}`,
      (f) => {
        if (f.event === "error") {
          setStatus(`Stream ended: ${JSON.parse(f.data).message ?? f.data}`);
          return;
        }
        pending.push(JSON.parse(f.data) as string);
        timer ??= setTimeout(flush, 50);
      },
      { signal: abort.signal },
    ).then(
      () => setStatus("The log ended."),
      (e) => !abort.signal.aborted && setStatus(`Log unavailable: ${messageOf(e)}`),
    );
    return () => {
      abort.abort();
      clearTimeout(timer);
    };
  }, [props.i.id, source, props.i.state === "Stopped"]);
  useEffect(() => {
    const el = box.current;
    if (el) el.scrollTop = el.scrollHeight;
  }, [lines]);
  return (
    <section aria-labelledby="logs-title">
      <div class="section-head">
        <h2 id="logs-title">Logs</h2>
        <label>
          Source{" "}
          <select value={source} onChange={(e) => setSource(e.currentTarget.value as LogSource)}>
            <option value="app">Guest console (app)</option>
            <option value="vmm">Hypervisor (vmm)</option>
            <option value="hypeman">Operations (hypeman)</option>
          </select>
        </label>
        <span class="hint" role="status">
          {status}
        </span>
      </div>
      {/* biome-ignore lint/a11y/noNoninteractiveTabindex: a scrolling region is reached by keyboard to scroll it */}
      <pre class="logs" ref={box} role="log" tabIndex={0} aria-label="Log lines" data-testid="logs">
        {lines.join("\n")}
      </pre>
    </section>
  );
}

function SnapshotForm(props: { i: Instance }) {
  const [kind, setKind] = useState<SnapshotKind>("Standby");
  const [made, setMade] = useState<Snapshot | null>(null);
  const action = useAction();
  return (
    <section aria-labelledby="snapshot-title">
      <h2 id="snapshot-title">Snapshot</h2>
      <form
        class="inline"
        onSubmit={async (e) => {
          e.preventDefault();
          await action.run(async () =>
            setMade(await api.post<Snapshot>(`/instances/${enc(props.i.id)}/snapshots`, { kind })),
          );
        }}
      >
        <label>
          Kind{" "}
          <select value={kind} onChange={(e) => setKind(e.currentTarget.value as SnapshotKind)}>
            <option value="Standby">Standby (memory and disk)</option>
            <option value="Stopped">Stopped (disk only)</option>
          </select>
        </label>
        <button type="submit" disabled={action.busy}>
          Take snapshot
        </button>
      </form>
      <ErrorNote error={action.error} />
      {made && (
        <p role="status">
          Snapshot {made.id} taken. <a href="#/snapshots">Snapshots</a>
        </p>
      )}
    </section>
  );
}
