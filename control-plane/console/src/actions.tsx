// What can be done to an instance — the lifecycle verbs, delete, fork — with the same rules the
// API applies (shared/: VERB_FROM, FORKABLE, InstanceName), so a button is offered only where
// the API would accept it, and any refusal still shows the API's own message.
import {
  FORKABLE,
  type ForkTargetState,
  type Instance,
  InstanceName,
  VERB_FROM,
} from "@offshoot/shared";
import { useState } from "preact/hooks";
import { api, enc } from "./api.ts";
import type { LiveInstances } from "./live.ts";
import { Dialog, DialogButtons, ErrorNote, useAction } from "./ui.tsx";

type Verb = keyof typeof VERB_FROM;
const VERBS: Verb[] = ["start", "stop", "standby", "restore"];
const LABEL: Record<Verb, string> = {
  start: "Start",
  stop: "Stop",
  standby: "Standby",
  restore: "Restore",
};
/** Verbs that end what the guest is doing: asked for again before they run. */
const CONFIRM: Partial<Record<Verb, string>> = {
  stop: "Stop {name}? Its program is ended and its memory is lost.",
};

/** The first error of a name as the API would judge it, or undefined. */
export function nameProblem(name: string): string | undefined {
  const r = InstanceName.safeParse(name);
  return r.success ? undefined : r.error.issues[0]?.message;
}

const NAME_RULE =
  "Lowercase letters, digits and dashes; not starting or ending with a dash; at most 63.";

/** A new instance's name, with the API's rule beneath it — or, once `checked`, what is wrong. */
export function NameField(props: {
  id: string;
  label: string;
  value: string;
  checked: boolean;
  onInput: (value: string) => void;
}) {
  const problem = props.checked ? nameProblem(props.value) : undefined;
  return (
    <>
      <label for={props.id}>{props.label}</label>
      <input
        id={props.id}
        value={props.value}
        required
        maxLength={63}
        aria-invalid={problem ? true : undefined}
        aria-describedby={`${props.id}-rule`}
        onInput={(e) => props.onInput(e.currentTarget.value)}
      />
      <p id={`${props.id}-rule`} class={problem ? "hint invalid" : "hint"}>
        {problem ?? NAME_RULE}
      </p>
    </>
  );
}

/** A fork's target_state: empty for "as its source". */
export function TargetStateField(props: {
  id: string;
  label: string;
  source: string;
  value: "" | ForkTargetState;
  onChange: (value: "" | ForkTargetState) => void;
}) {
  return (
    <>
      <label for={props.id}>{props.label}</label>
      <select
        id={props.id}
        value={props.value}
        onChange={(e) => props.onChange(e.currentTarget.value as "" | ForkTargetState)}
      >
        <option value="">As {props.source}</option>
        <option value="Running">Running</option>
        <option value="Standby">Standby</option>
        <option value="Stopped">Stopped</option>
      </select>
    </>
  );
}

export function InstanceActions(props: {
  instance: Instance;
  live: LiveInstances;
  onDeleted?: () => void;
  compact?: boolean;
}) {
  const i = props.instance;
  const action = useAction();
  const [forking, setForking] = useState(false);
  const [deleting, setDeleting] = useState(false);
  const [confirmVerb, setConfirmVerb] = useState<Verb | null>(null);
  const runVerb = (verb: Verb) =>
    action.run(async () =>
      props.live.put(await api.post<Instance>(`/instances/${enc(i.id)}/${verb}`)),
    );
  const label = (what: string) => `${what} ${i.name}`;
  return (
    <div class="actions">
      {VERBS.filter((v) => VERB_FROM[v].includes(i.state)).map((v) => (
        <button
          key={v}
          type="button"
          disabled={action.busy}
          aria-label={props.compact ? label(LABEL[v]) : undefined}
          onClick={() => (CONFIRM[v] ? setConfirmVerb(v) : runVerb(v))}
        >
          {LABEL[v]}
        </button>
      ))}
      {FORKABLE.includes(i.state) && (
        <button
          type="button"
          disabled={action.busy}
          aria-label={props.compact ? label("Fork") : undefined}
          onClick={() => setForking(true)}
        >
          Fork
        </button>
      )}
      <button
        type="button"
        class="danger"
        disabled={action.busy}
        aria-label={props.compact ? label("Delete") : undefined}
        onClick={() => setDeleting(true)}
      >
        Delete
      </button>
      <ErrorNote error={action.error} />
      {forking && <ForkDialog source={i} live={props.live} onClose={() => setForking(false)} />}
      {confirmVerb && (
        <Confirm
          title={`${LABEL[confirmVerb]} ${i.name}`}
          text={(CONFIRM[confirmVerb] ?? "").replace("{name}", i.name)}
          verb={LABEL[confirmVerb]}
          onClose={() => setConfirmVerb(null)}
          onConfirm={() => runVerb(confirmVerb)}
        />
      )}
      {deleting && (
        <Confirm
          title={`Delete ${i.name}`}
          text={`Delete ${i.name}? Its disk and memory are removed; forks made from it keep running.`}
          verb="Delete"
          onClose={() => setDeleting(false)}
          onConfirm={() =>
            action.run(async () => {
              await api.del(`/instances/${enc(i.id)}`);
              props.live.remove(i.id);
              props.onDeleted?.();
            })
          }
        />
      )}
    </div>
  );
}

export function Confirm(props: {
  title: string;
  text: string;
  verb: string;
  onClose: () => void;
  onConfirm: () => Promise<unknown>;
}) {
  return (
    <Dialog title={props.title} onClose={props.onClose}>
      <p>{props.text}</p>
      <div class="buttons">
        <button type="button" onClick={props.onClose}>
          Cancel
        </button>
        <button
          type="button"
          class="danger"
          onClick={() => {
            props.onClose();
            void props.onConfirm();
          }}
        >
          {props.verb}
        </button>
      </div>
    </Dialog>
  );
}

export function ForkDialog(props: { source: Instance; live: LiveInstances; onClose: () => void }) {
  const s = props.source;
  const [name, setName] = useState(`${s.name}-fork`.slice(0, 63));
  const [fromRunning, setFromRunning] = useState(s.state === "Running");
  const [target, setTarget] = useState<"" | ForkTargetState>("");
  const [touched, setTouched] = useState(false);
  const action = useAction();
  const problem = nameProblem(name);
  return (
    <Dialog title={`Fork ${s.name}`} onClose={props.onClose}>
      <form
        onSubmit={async (e) => {
          e.preventDefault();
          setTouched(true);
          if (problem) return;
          const ok = await action.run(async () =>
            props.live.put(
              await api.post<Instance>(`/instances/${enc(s.id)}/fork`, {
                name,
                from_running: fromRunning,
                ...(target && { target_state: target }),
              }),
            ),
          );
          if (ok) props.onClose();
        }}
      >
        <NameField
          id="fork-name"
          label="Name of the fork"
          value={name}
          checked={touched}
          onInput={(v) => {
            setName(v);
            setTouched(true);
          }}
        />
        <label class="check">
          <input
            type="checkbox"
            checked={fromRunning}
            onChange={(e) => setFromRunning(e.currentTarget.checked)}
          />
          Fork while running (<code>from_running</code>): the source pauses for a moment, then goes
          on
        </label>
        {s.state === "Running" && !fromRunning && (
          <p class="hint">A Running source can only be forked with this set.</p>
        )}
        <TargetStateField
          id="fork-target"
          label="State of the fork"
          source={`the source (${s.state})`}
          value={target}
          onChange={setTarget}
        />
        <ErrorNote error={action.error} />
        <DialogButtons
          onCancel={props.onClose}
          busy={action.busy}
          label="Fork"
          busyLabel="Forking…"
        />
      </form>
    </Dialog>
  );
}
