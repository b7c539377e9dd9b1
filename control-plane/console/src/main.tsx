// The web console: a single-page app over the same REST API programs use. Pages are addressed
// by the URL's fragment (#/instances/…), so the server only ever serves index.html and its
// assets, on Node and on the Workers assets binding alike.
import "./zod-setup.ts"; // first: before any schema is made
import "./style.css";
import type { HostView } from "@offshoot/shared";
import { render } from "preact";

import { useEffect, useMemo, useState } from "preact/hooks";
import { api, session } from "./api.ts";
import { LiveInstances } from "./live.ts";
import { HostsPage } from "./pages/hosts.tsx";
import { ImagesPage } from "./pages/images.tsx";
import { InstancePage } from "./pages/instance.tsx";
import { InstancesPage } from "./pages/instances.tsx";
import { SignIn } from "./pages/signin.tsx";
import { SnapshotsPage } from "./pages/snapshots.tsx";

const route = () => location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);

function useRoute(): string[] {
  const [r, setR] = useState(route);
  useEffect(() => {
    const on = () => setR(route());
    addEventListener("hashchange", on);
    return () => removeEventListener("hashchange", on);
  }, []);
  return r;
}

/** Host ids to names, for the instance table and pages. */
export type HostNames = Map<string, string>;

function Console(props: { onSignOut: (message?: string) => void }) {
  const live = useMemo(() => new LiveInstances((m) => props.onSignOut(m)), []);
  useEffect(() => () => live.stop(), [live]);
  const [hosts, setHosts] = useState<HostNames>(new Map());
  useEffect(() => {
    api.get<HostView[]>("/hosts").then(
      (hs) => setHosts(new Map(hs.map((h) => [h.id, h.name]))),
      () => {},
    );
  }, []);
  const [page = "instances", id] = useRoute();
  const nav: Array<[string, string]> = [
    ["instances", "Instances"],
    ["snapshots", "Snapshots"],
    ["images", "Images"],
    ["hosts", "Hosts"],
  ];
  useEffect(() => {
    document.title = `${nav.find(([p]) => p === page)?.[1] ?? "Offshoot"} · Offshoot console`;
    document.querySelector<HTMLElement>("main h1")?.focus();
  }, [page, id]);
  return (
    <>
      <button type="button" class="skip" onClick={() => document.getElementById("main")?.focus()}>
        Skip to content
      </button>
      <header class="top">
        <span class="brand">Offshoot</span>
        <nav aria-label="Sections">
          {nav.map(([p, label]) => (
            <a key={p} href={`#/${p}`} aria-current={page === p ? "page" : undefined}>
              {label}
            </a>
          ))}
        </nav>
        <button type="button" class="quiet" onClick={() => props.onSignOut()}>
          Sign out
        </button>
      </header>
      <main id="main" tabIndex={-1}>
        {page === "instances" && id ? (
          <InstancePage id={id} live={live} hosts={hosts} />
        ) : page === "snapshots" ? (
          <SnapshotsPage live={live} />
        ) : page === "images" ? (
          <ImagesPage />
        ) : page === "hosts" ? (
          <HostsPage />
        ) : (
          <InstancesPage live={live} hosts={hosts} />
        )}
      </main>
    </>
  );
}

function App() {
  const [key, setKey] = useState(session.key());
  const [notice, setNotice] = useState<string | undefined>();
  if (!key) {
    return (
      <SignIn
        notice={notice}
        onSignedIn={(k) => {
          session.signIn(k);
          setNotice(undefined);
          setKey(k);
        }}
      />
    );
  }
  return (
    <Console
      key={key}
      onSignOut={(message) => {
        session.signOut();
        setNotice(message);
        setKey(null);
      }}
    />
  );
}

const root = document.getElementById("app");
if (root) render(<App />, root);
