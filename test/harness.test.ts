// The harness itself, end to end: a test database, a real control-plane process, its auth, and a
// restart on the same port.
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import {
  api,
  type CpProcess,
  hostOnline,
  registerHost,
  seedTenant,
  spawnAgent,
  spawnControlPlane,
  type TestDatabase,
  testDatabase,
  waitFor,
} from "./harness.ts";

describe("integration harness", () => {
  let tdb: TestDatabase;
  let cp: CpProcess;
  let apiKey: string;

  beforeAll(async () => {
    tdb = await testDatabase();
    ({ apiKey } = await seedTenant(tdb.database.db));
    await registerHost(tdb.database.db);
    cp = await spawnControlPlane({ databaseUrl: tdb.url });
  });

  afterAll(async () => {
    await cp?.stop();
    await tdb?.drop();
  });

  it("serves /health and an empty instance list to a seeded tenant", async () => {
    const call = api(cp.url, apiKey);
    const health = await call("GET", "/health");
    expect(health.status).toBe(200);
    expect(health.body).toEqual({ status: "ok", database: "up" });

    const list = await call("GET", "/instances");
    expect(list.status).toBe(200);
    expect(list.body).toEqual([]);
  });

  it("answers 401 unauthorized without a key or with a wrong one", async () => {
    const anonymous = await api(cp.url)("GET", "/instances");
    expect(anonymous.status).toBe(401);
    expect(anonymous.body).toMatchObject({ code: "unauthorized" });

    const wrong = await api(cp.url, "osk_not-a-real-key")("GET", "/instances");
    expect(wrong.status).toBe(401);
    expect(wrong.body).toMatchObject({ code: "unauthorized" });
  });

  it("restarts on the same port after SIGKILL", async () => {
    const { port, url } = cp;
    const oldPid = cp.pid;
    await cp.kill("SIGKILL");
    await expect(fetch(`${url}/health`)).rejects.toThrow();

    await cp.restart();
    expect(cp.pid).not.toBe(oldPid);
    const health = await waitFor(
      async () => {
        const r = await api(url, apiKey)("GET", "/health");
        return r.status === 200 ? r : undefined;
      },
      { what: "/health after restart", timeoutMs: 5000 },
    );
    expect(health.body).toEqual({ status: "ok", database: "up" });
    // The tenant's key lives in the database, so it still works.
    expect((await api(url, apiKey)("GET", "/instances")).status).toBe(200);
    // Both runs said they listen, on the one port.
    const listening = cp
      .output()
      .split("\n")
      .filter((l) => l.includes('"msg":"listening"'))
      .map((l) => (JSON.parse(l) as { port: number }).port);
    expect(listening).toEqual([port, port]);
  });

  it("gets the server URL from global setup, by env and by inject", () => {
    const fromEnv = process.env.TEST_DATABASE_URL;
    expect(fromEnv).toMatch(/^postgres:\/\//);
    expect(inject("testDatabaseUrl")).toBe(fromEnv);
    expect(new URL(tdb.url).host).toBe(new URL(fromEnv ?? "").host);
    expect(new URL(tdb.url).pathname).toMatch(/^\/t_[0-9a-f]+$/);
  });
});

describe("integration harness with a host agent", () => {
  it("starts a sim agent that brings its host online", async () => {
    const tdb = await testDatabase();
    const { hostId, token } = await registerHost(tdb.database.db);
    const cp = await spawnControlPlane({ databaseUrl: tdb.url });
    const agent = await spawnAgent({ cpUrl: cp.url, token });
    try {
      await hostOnline(tdb.database.db, hostId);
      expect(agent.execLog()).toEqual([]);
    } finally {
      await agent.stop();
      await cp.stop();
      await tdb.drop();
    }
  });
});
