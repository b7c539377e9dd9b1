import { sql } from "drizzle-orm";
import fc from "fast-check";
import { beforeAll, describe, expect, it } from "vitest";
import { events, instances, operations } from "../../control-plane/src/db/schema/index.ts";
import { api } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

// Property-based fuzzing of every endpoint's body, query and path against the real server:
// never a 500, always `{code, message}` on an error, and nothing written when rejected.

const RUNS = 60;

async function counts(stack: Stack): Promise<string> {
  const [row] = await stack.db
    .select({
      i: sql<number>`(select count(*) from ${instances})::int`,
      o: sql<number>`(select count(*) from ${operations})::int`,
      e: sql<number>`(select count(*) from ${events})::int`,
    })
    .from(sql`(select 1) as one`);
  return JSON.stringify(row);
}

const validCreate = {
  name: "ok",
  image: "alpine",
  size: "256MB",
  vcpus: 1,
};

// Values that stress validators: wrong types, huge numbers, odd strings, nesting.
const nasty = fc.oneof(
  fc.anything({ maxDepth: 2 }),
  fc.string({ maxLength: 80 }),
  fc.constantFrom(
    "",
    " ",
    "\u0000",
    "-",
    "a".repeat(64),
    "1e400",
    "NaN",
    "../../etc/passwd",
    "%00",
    "💥",
    "UPPER",
    "-1GB",
    "1.5bps",
    "\ud800",
    "a\udfffb",
  ),
  fc.integer(),
  fc.double(),
  fc.constant(null),
);

function mutate(base: Record<string, unknown>, keys: string[]) {
  return fc
    .record({ key: fc.constantFrom(...keys), value: nasty, drop: fc.boolean() })
    .map(({ key, value, drop }) => {
      const copy: Record<string, unknown> = { ...base };
      if (drop) delete copy[key];
      else copy[key] = value;
      return copy;
    });
}

function expectErrorShape(r: { status: number; body: unknown }, what: string) {
  // 501 not_supported is a deliberate answer (a field we do not implement); any other 5xx is a bug.
  expect(
    r.status < 500 || r.status === 501,
    `${what} → ${r.status} ${JSON.stringify(r.body)}`,
  ).toBe(true);
  if (r.status >= 400) {
    const b = r.body as { code?: unknown; message?: unknown };
    expect(typeof b.code, what).toBe("string");
    expect(typeof b.message, what).toBe("string");
  }
}

/** The body as it arrives within `ms`, then the stream is cancelled. */
async function readFor(res: Response, ms: number): Promise<string> {
  const reader = res.body?.getReader();
  if (!reader) return "";
  const decoder = new TextDecoder();
  let text = "";
  const timer = setTimeout(() => void reader.cancel(), ms);
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
  } finally {
    clearTimeout(timer);
  }
  return text + decoder.decode();
}

describe("bad input", () => {
  let stack: Stack;
  let call: ReturnType<typeof api>;
  /** The fixtures' ids: a random path that is a prefix of one addresses that fixture. */
  const fixtureIds: string[] = [];
  /** POSTs, checks the error shape and that a rejection wrote nothing; removes what it made. */
  async function postChecked(path: string, body: unknown) {
    const before = await counts(stack);
    const r = await call("POST", path, body);
    expectErrorShape(r, `${path} ${JSON.stringify(body)}`);
    if (r.status >= 400) expect(await counts(stack)).toBe(before);
    if (r.status === 201) {
      const id = (r.body as { id: string }).id;
      expect((await call("DELETE", `/instances/${id}`)).status).toBe(204);
    }
  }
  beforeAll(async () => {
    stack = await startStack();
    call = api(stack.cp.url, stack.apiKey);
    // Fixtures for verbs that need an instance in a given state.
    for (const [name, verb] of [
      ["fz-run", null],
      ["fz-stop", "stop"],
      ["fz-sb", "standby"],
    ] as const) {
      const created = await call("POST", "/instances", { ...validCreate, name });
      expect(created.status).toBe(201);
      fixtureIds.push((created.body as { id: string }).id);
      if (verb) expect((await call("POST", `/instances/${name}/${verb}`)).status).toBe(200);
    }
  });

  it("POST /instances: mutated and random bodies never 500 and write nothing when rejected", async () => {
    const keys = [
      "name",
      "image",
      "size",
      "vcpus",
      "hotplug_size",
      "overlay_size",
      "disk_io_bps",
      "env",
      "tags",
      "network",
      "volumes",
      "hypervisor",
      "entrypoint",
      "cmd",
      "platform",
      "devices",
      "gpu",
    ];
    await fc.assert(
      fc.asyncProperty(fc.oneof(mutate(validCreate, keys), fc.anything({ maxDepth: 2 })), (body) =>
        postChecked("/instances", body),
      ),
      { numRuns: RUNS },
    );
  });

  it("POST /instances/{id}/fork: mutated bodies and paths", async () => {
    const base = { name: "fz-fork", target_state: "Running", from_running: false };
    const path = fc.constantFrom(
      "fz-stop",
      "fz-sb",
      "fz-run",
      "nope",
      "%00",
      "a%2Fb",
      "fz",
      "..",
      "x".repeat(300),
    );
    await fc.assert(
      fc.asyncProperty(
        path,
        fc.oneof(
          mutate(base, ["name", "target_state", "from_running"]),
          fc.anything({ maxDepth: 2 }),
        ),
        (p, body) => postChecked(`/instances/${p}/fork`, body),
      ),
      { numRuns: RUNS },
    );
  });

  it("lifecycle verbs on paths and bodies of every kind", async () => {
    const verb = fc.constantFrom("start", "stop", "standby", "restore");
    const path = fc.oneof(
      fc.constantFrom("fz-run", "fz-stop", "fz-sb", "nope"),
      fc.string({ maxLength: 40 }).map(encodeURIComponent),
    );
    await fc.assert(
      fc.asyncProperty(verb, path, fc.option(fc.anything({ maxDepth: 2 })), async (v, p, body) => {
        const before = await counts(stack);
        const r = await call("POST", `/instances/${p}/${v}`, body ?? undefined);
        expectErrorShape(r, `${v} ${p} ${JSON.stringify(body)}`);
        if (r.status >= 400) expect(await counts(stack)).toBe(before);
        if (r.status === 200) {
          // Put fixtures back into the state the other cases expect.
          const undo: Record<string, string> = {
            start: "stop",
            stop: "start",
            standby: "restore",
            restore: "standby",
          };
          expect((await call("POST", `/instances/${p}/${undo[v]}`)).status).toBe(200);
        }
      }),
      { numRuns: RUNS },
    );
  });

  it("queries: list filters and wait parameters", async () => {
    const q = fc.dictionary(
      fc.oneof(
        fc.constantFrom(
          "state",
          "tags[team]",
          "tags[]",
          "tags[a b]",
          "timeout",
          "tags[\u0000]",
          "tail",
          "follow",
          "source",
        ),
        fc.string({ maxLength: 10 }),
      ),
      fc.oneof(
        fc.string({ maxLength: 20 }),
        fc.constantFrom(
          "Running",
          "Stopped",
          "1s",
          "10m",
          "-1s",
          "0s",
          "1e9h",
          "true",
          "app",
          "hypeman",
          "5",
        ),
      ),
      { maxKeys: 3 },
    );
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(
          "/instances",
          "/instances/fz-run/wait",
          "/instances/nope/wait",
          "/instances/fz-run/logs",
        ),
        q,
        async (p, query) => {
          const params = new URLSearchParams(query);
          const qs = params.toString();
          // A valid wait may legitimately block for minutes; one still blocked after 1.5 s has
          // accepted its parameters, which is all this property is about. Every other request
          // must be answered (30 s only matters on failure).
          const mayBlock = p.endsWith("/wait");
          const res = await fetch(`${stack.cp.url}${p}?${qs}`, {
            headers: { authorization: `Bearer ${stack.apiKey}` },
            signal: AbortSignal.timeout(mayBlock ? 1500 : 30_000),
          }).catch((e: unknown) => e);
          if (mayBlock && res instanceof Error && res.name === "TimeoutError") return;
          if (!(res instanceof Response)) throw res;
          if (res.headers.get("content-type")?.startsWith("text/event-stream")) {
            // A log stream: every event's data is one line as a JSON string. With follow=true
            // it goes on until the client leaves: what came in 1.5 s is checked.
            expect(res.status).toBe(200);
            const text =
              params.get("follow") === "true" ? await readFor(res, 1500) : await res.text();
            for (const m of text.matchAll(/^data: (.*)$/gm)) {
              expect(typeof JSON.parse(m[1] ?? "")).toBe("string");
            }
            return;
          }
          const r = { status: res.status, body: await res.json() };
          expectErrorShape(r, `${p}?${qs}`);
          if (p === "/instances" && r.status === 200) expect(Array.isArray(r.body)).toBe(true);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it("GET and DELETE on arbitrary paths", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom("GET", "DELETE"),
        fc.string({ maxLength: 60 }),
        async (m, raw) => {
          const p = encodeURIComponent(raw);
          // Addressing a fixture (by name or unique id prefix) would delete it under the other cases.
          if (["fz-run", "fz-stop", "fz-sb"].includes(raw)) return;
          if (raw !== "" && fixtureIds.some((id) => id.startsWith(raw))) return;
          const before = await counts(stack);
          const r = await call(m, `/instances/${p}`);
          expectErrorShape(r, `${m} ${raw}`);
          if (r.status >= 400) expect(await counts(stack)).toBe(before);
        },
      ),
      { numRuns: RUNS },
    );
  });

  it("malformed JSON and wrong content types are 400 invalid_request", async () => {
    const raw = async (body: string, type: string) => {
      const res = await fetch(`${stack.cp.url}/instances`, {
        method: "POST",
        headers: { authorization: `Bearer ${stack.apiKey}`, "content-type": type },
        body,
      });
      return { status: res.status, body: await res.json() };
    };
    for (const [body, type] of [
      ["{", "application/json"],
      ["name=x", "application/x-www-form-urlencoded"],
      ["[]", "application/json"],
      ["null", "application/json"],
    ]) {
      const r = await raw(body as string, type as string);
      expect(r.status, body).toBe(400);
      expect(r.body).toMatchObject({ code: "invalid_request" });
    }
  });

  it("strings Postgres cannot store (NUL, unpaired surrogates) are 400 and write nothing", async () => {
    for (const body of [
      { ...validCreate, name: "nul-1", env: { A: "x\u0000y" } },
      { ...validCreate, name: "sur-1", env: { A: "\ud800" } },
      {
        ...validCreate,
        name: "sur-2",
        volumes: [{ volume_id: "v\udc00", mount_path: "/d", readonly: true }],
      },
      { ...validCreate, name: "sur-3", cmd: ["echo", "\udfff"] },
    ]) {
      const before = await counts(stack);
      const r = await call("POST", "/instances", body);
      expect(r.status, JSON.stringify(body)).toBe(400);
      expect(r.body).toMatchObject({ code: "invalid_request" });
      expect(await counts(stack)).toBe(before);
    }
  });

  it("missing or invalid key → 401 on every instance route", async () => {
    const noKey = api(stack.cp.url, "");
    const badKey = api(stack.cp.url, "osk_not-a-real-key-at-all");
    for (const c of [noKey, badKey]) {
      for (const [m, p] of [
        ["GET", "/instances"],
        ["POST", "/instances"],
        ["GET", "/instances/fz-run"],
        ["POST", "/instances/fz-run/fork"],
        ["DELETE", "/instances/fz-run"],
        ["GET", "/instances/fz-run/wait?state=Running"],
      ] as const) {
        const r = await c(m, p, m === "POST" ? validCreate : undefined);
        expect(r.status, `${m} ${p}`).toBe(401);
        expect(r.body).toMatchObject({ code: "unauthorized" });
      }
    }
    expect((await call("GET", "/instances/fz-run")).status).toBe(200);
  });
});
