// The tenant's instances, kept current by the event stream (GET /events): listed once the
// stream is open, then changed by each event, which carries the instance as it is. A dropped
// stream reconnects with Last-Event-ID, so nothing is missed.
import type { Instance, TenantEvent } from "@offshoot/shared";
import { useEffect, useState } from "preact/hooks";
import { ApiError, api, readSse } from "./api.ts";

export type LiveStatus = "connecting" | "live" | "retrying";

/** The longest wait between reconnects. */
const MAX_RETRY_MS = 10_000;

export class LiveInstances {
  readonly instances = new Map<string, Instance>();
  status: LiveStatus = "connecting";
  error: string | null = null;
  private readonly listeners = new Set<() => void>();
  private readonly abort = new AbortController();
  private lastEventId: string | undefined;

  constructor(private readonly onUnauthorized: (message: string) => void) {
    void this.run();
  }

  stop() {
    this.abort.abort();
  }

  subscribe(fn: () => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** What a request answered: shown at once, before its event arrives. */
  put(instance: Instance) {
    this.instances.set(instance.id, instance);
    this.changed();
  }

  remove(id: string) {
    this.instances.delete(id);
    this.changed();
  }

  private changed() {
    for (const fn of this.listeners) fn();
  }

  private async run() {
    let retryMs = 1000;
    const signal = this.abort.signal;
    while (!signal.aborted) {
      try {
        await readSse(
          "/events",
          (frame) => {
            if (frame.event === "error") throw new Error(JSON.parse(frame.data).message);
            const e = JSON.parse(frame.data) as TenantEvent;
            this.lastEventId = frame.id ?? String(e.id);
            if (!e.instance_id) return;
            if (e.type === "instance.deleted" || e.instance === null) {
              this.instances.delete(e.instance_id);
            } else if (e.instance) {
              this.instances.set(e.instance_id, e.instance);
            }
            this.changed();
          },
          {
            signal,
            headers: this.lastEventId ? { "last-event-id": this.lastEventId } : {},
            onOpen: async () => {
              // No event seen yet (first connection, or none since): the stream starts with the
              // next event, so list what is now.
              if (this.lastEventId === undefined) {
                const all = await api.get<Instance[]>("/instances", signal);
                this.instances.clear();
                for (const i of all) this.instances.set(i.id, i);
              }
              this.status = "live";
              this.error = null;
              retryMs = 1000;
              this.changed();
            },
          },
        );
        this.error = "the event stream ended";
      } catch (e) {
        if (signal.aborted) return;
        if (e instanceof ApiError && e.status === 401) {
          this.onUnauthorized(e.message);
          return;
        }
        this.error = e instanceof Error ? e.message : String(e);
      }
      this.status = "retrying";
      this.changed();
      await new Promise((r) => setTimeout(r, retryMs));
      retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
    }
  }
}

/** Re-renders the caller on every change of `live`. */
export function useLive(live: LiveInstances): LiveInstances {
  const [, bump] = useState(0);
  useEffect(() => live.subscribe(() => bump((n) => n + 1)), [live]);
  return live;
}
