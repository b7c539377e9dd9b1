// GET /events through real processes (control plane, sim agent, Postgres server): a tenant's
// stream carries its instances' creation, every change of state and deletion, in order, with the
// instance as it is; another tenant's stream carries none of it; Last-Event-ID resumes it.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { EVENT_STREAMS_PER_TENANT } from "../../control-plane/src/services/events.ts";
import { api, openEvents, seedTenant, waitFor } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

describe("GET /events", () => {
  let stack: Stack;
  const streams: { close: () => void }[] = [];
  beforeAll(async () => {
    stack = await startStack();
  });
  afterAll(() => {
    for (const s of streams) s.close();
  });
  const open = async (key: string, headers?: Record<string, string>) => {
    const s = await openEvents(stack.cp.url, key, headers);
    streams.push(s);
    return s;
  };

  it("streams a tenant's instances' creation, states and deletion, in order, to it alone", async () => {
    const call = api(stack.cp.url, stack.apiKey);
    const other = await seedTenant(stack.db);
    const mine = await open(stack.apiKey);
    const theirs = await open(other.apiKey);
    expect(mine.status).toBe(200);
    expect(mine.res.headers.get("content-type")).toMatch(/^text\/event-stream/);

    const made = await call("POST", "/instances", { name: "ev-1", image: "alpine", vcpus: 1 });
    expect(made.status, JSON.stringify(made.body)).toBe(201);
    const fork = await call("POST", "/instances/ev-1/fork", { name: "ev-2", from_running: true });
    expect(fork.status, JSON.stringify(fork.body)).toBe(201);
    const forkId = (fork.body as { id: string }).id;
    // Lineage, an extension of Hypeman's Instance: a fork names its source, a create nothing.
    expect(fork.body).toMatchObject({ forked_from: (made.body as { id: string }).id });
    expect(made.body).toMatchObject({ forked_from: null });
    expect((await call("POST", "/instances/ev-2/stop")).status).toBe(200);
    expect((await call("DELETE", "/instances/ev-2")).status).toBe(204);

    const seen = await mine.until((e) => e.type === "instance.deleted" && e.instance_id === forkId);
    const ids = seen.map((e) => e.id);
    expect(ids).toEqual([...ids].sort((a, b) => a - b));
    const of = (id: string) =>
      seen
        .filter((e) => e.instance_id === id)
        .map((e) => (e.type === "instance.state" ? `${e.data.from}->${e.data.to}` : e.type));
    const firstId = (made.body as { id: string }).id;
    expect(of(firstId)[0]).toBe("instance.created");
    expect(of(firstId)).toContain("Created->Running");
    expect(of(forkId)[0]).toBe("instance.created");
    expect(of(forkId)).toContain("Running->Stopped");
    expect(of(forkId).at(-1)).toBe("instance.deleted");
    const created = seen.find((e) => e.instance_id === forkId);
    expect(created?.data).toMatchObject({ name: "ev-2", forked_from: firstId });
    // The instance as it is when sent: gone once deleted.
    expect(seen.at(-1)?.instance).toBeNull();

    // The other tenant's stream carried none of it: its first event is its own.
    const own = await api(stack.cp.url, other.apiKey)("POST", "/instances", {
      name: "theirs",
      image: "alpine",
      vcpus: 1,
    });
    expect(own.status).toBe(201);
    const first = await theirs.next();
    expect(first).toMatchObject({
      type: "instance.created",
      instance_id: (own.body as { id: string }).id,
    });

    // Resuming after the first event starts with the second.
    const resumed = await open(stack.apiKey, { "last-event-id": String(seen[0]?.id) });
    expect((await resumed.next()).id).toBe(seen[1]?.id);
    resumed.close();
  });

  it("refuses a stream without a key, and past the tenant's limit", async () => {
    expect((await fetch(`${stack.cp.url}/events`)).status).toBe(401);
    const t = await seedTenant(stack.db);
    const held = [];
    for (let i = 0; i < EVENT_STREAMS_PER_TENANT; i++) held.push(await open(t.apiKey));
    expect(held.every((s) => s.status === 200)).toBe(true);
    const over = await fetch(`${stack.cp.url}/events`, {
      headers: { authorization: `Bearer ${t.apiKey}` },
    });
    expect(over.status).toBe(429);
    expect(await over.json()).toMatchObject({ code: "too_many_requests" });
    // A closed stream gives its place back.
    held[0]?.close();
    const again = await waitFor(
      async () => {
        const s = await open(t.apiKey);
        if (s.status === 200) return s;
        s.close();
        return undefined;
      },
      { what: "the closed stream's place given back" },
    );
    expect(again.status).toBe(200);
  });
});
