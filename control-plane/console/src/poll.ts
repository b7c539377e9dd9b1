import { useEffect, useState } from "preact/hooks";
import { api } from "./api.ts";

/** GETs `path` now and every `everyMs` while `again(value)` says so (or always). */
export function usePoll<T>(path: string, everyMs: number, again: (v: T) => boolean = () => true) {
  const [value, setValue] = useState<T | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [tick, setTick] = useState(0);
  useEffect(() => {
    const abort = new AbortController();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const load = () =>
      api.get<T>(path, abort.signal).then(
        (v) => {
          setValue(v);
          setError(null);
          if (again(v)) timer = setTimeout(load, everyMs);
        },
        (e) => {
          if (abort.signal.aborted) return;
          setError(e);
          timer = setTimeout(load, everyMs);
        },
      );
    void load();
    return () => {
      abort.abort();
      clearTimeout(timer);
    };
  }, [path, tick]);
  return { value, error, reload: () => setTick((n) => n + 1) };
}
