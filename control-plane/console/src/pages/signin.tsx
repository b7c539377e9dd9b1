import type { Instance } from "@offshoot/shared";
import { useState } from "preact/hooks";
import { request } from "../api.ts";
import { ErrorNote, useAction } from "../ui.tsx";

/** Signs in with an API key, checked by listing the tenant's instances with it. */
export function SignIn(props: { notice?: string; onSignedIn: (key: string) => void }) {
  const [key, setKey] = useState("");
  const action = useAction();
  return (
    <main id="main" class="signin">
      <h1>Offshoot console</h1>
      <p>Sign in with an API key. It is kept in this browser tab only, until you sign out.</p>
      {props.notice && (
        <p class="error" role="alert">
          {props.notice}
        </p>
      )}
      <form
        onSubmit={async (e) => {
          e.preventDefault();
          const k = key.trim();
          const ok = await action.run(() =>
            request<Instance[]>("GET", "/instances", undefined, { key: k }),
          );
          if (ok) props.onSignedIn(k);
        }}
      >
        <label for="api-key">API key</label>
        <input
          id="api-key"
          type="password"
          autoComplete="off"
          spellcheck={false}
          required
          value={key}
          onInput={(e) => setKey(e.currentTarget.value)}
        />
        <ErrorNote error={action.error} />
        <button type="submit" disabled={action.busy || key.trim() === ""}>
          {action.busy ? "Signing in…" : "Sign in"}
        </button>
      </form>
    </main>
  );
}
