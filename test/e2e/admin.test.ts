import { execFileSync } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  api,
  hostOnline,
  REPO_ROOT,
  spawnAgent,
  spawnControlPlane,
  testDatabase,
  waitFor,
} from "../harness.ts";

// The admin CLI against a real Postgres server, and what it makes used for real.
describe("admin CLI", () => {
  let database: Awaited<ReturnType<typeof testDatabase>>;
  const admin = (...args: string[]) =>
    execFileSync(process.execPath, ["--import", "tsx", "control-plane/src/admin.ts", ...args], {
      cwd: REPO_ROOT,
      env: { ...process.env, DATABASE_URL: database.url },
      encoding: "utf8",
    });
  beforeAll(async () => {
    database = await testDatabase();
  });
  afterAll(async () => {
    await database.drop();
  });

  it("creates a tenant, a key and a host token that the server and an agent accept", async () => {
    expect(JSON.parse(admin("tenant", "create", "acme"))).toMatchObject({ name: "acme" });
    const { api_key: key, key_id: keyId } = JSON.parse(
      admin("key", "create", "acme", "--name", "ci"),
    );
    expect(key).toMatch(/^osk_/);
    const { host_token: token, host_id: hostId } = JSON.parse(admin("host", "create", "rack1"));
    expect(token).toMatch(/^oht_/);

    // A short key cache, so that the revocation below is seen soon after it is made.
    const cp = await spawnControlPlane({
      databaseUrl: database.url,
      env: { API_KEY_CACHE_MS: "200" },
    });
    const agent = await spawnAgent({ cpUrl: cp.url, token });
    await hostOnline(database.database.db, hostId);
    const call = api(cp.url, key);
    const r = await call("POST", "/instances", {
      name: "a1",
      image: "alpine",
      vcpus: 1,
      size: "256MB",
    });
    expect(r.status, JSON.stringify(r.body)).toBe(201);
    expect(admin("host", "list")).toContain('"status":"online"');

    // Only the hash is stored: the key itself appears nowhere in the database.
    const rows = await database.database.db.execute(
      `select key_hash, prefix from api_keys` as never,
    );
    expect(JSON.stringify(rows)).not.toContain(key);

    // A revoked key stops working once the server's positive cache has let go of it.
    admin("key", "revoke", keyId);
    await waitFor(async () => (await call("GET", "/instances")).status === 401, {
      timeoutMs: 30_000,
      what: "the revoked key to be refused",
    });
    expect((await call("GET", "/instances")).body).toMatchObject({ code: "unauthorized" });
    await agent.stop();
    await cp.stop();
  });

  it("refuses unknown commands and missing arguments with usage", () => {
    expect(() => admin("frobnicate", "now")).toThrow(/usage/);
    expect(() => admin("key", "create", "no-such-tenant")).toThrow(/no tenant named/);
  });
});
