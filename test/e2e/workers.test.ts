import { appendFileSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { gzipSync } from "node:zlib";
import { eq, sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { volumes } from "../../control-plane/src/db/schema/index.ts";
import { agentPaths } from "../../host-agent/src/paths.ts";
import { push, startRegistry } from "../../host-agent/testing/registry.ts";
import { readRootfs } from "../../host-agent/testing/rootfs.ts";
import { file, tar, writeLayout } from "../../scripts/oci-layout.ts";
import { consolePage, launchBrowser, signIn } from "../browser.ts";
import { execOnce } from "../exec-client.ts";
import {
  type AgentProcess,
  hostOnline,
  hypeman,
  openEvents,
  registerHost,
  seedTenant,
  spawnAgent,
  sseData,
  type TestDatabase,
  testDatabase,
  waitFor,
} from "../harness.ts";
import { type Wrangler, wranglerDev } from "../wrangler.ts";
import { clientScenario, snapshotScenario } from "./scenarios.ts";

// The Workers deployment, run locally: `wrangler dev` (workerd) with the Hyperdrive binding
// pointed at the test's Postgres database, a real sim agent connecting to its HostSession
// Durable Object over a WebSocket, and the official client's whole scenario.

describe("Cloudflare Workers deployment (wrangler dev)", { timeout: 120_000 }, () => {
  let database: TestDatabase;
  let worker: Wrangler;
  let agent: AgentProcess;
  let apiKey: string;

  beforeAll(async () => {
    database = await testDatabase();
    ({ apiKey } = await seedTenant(database.database.db));
    worker = await wranglerDev(database.url);
    const { hostId, token } = await registerHost(database.database.db);
    agent = await spawnAgent({ cpUrl: worker.url, token });
    await hostOnline(database.database.db, hostId, 30_000).catch((e: unknown) => {
      throw new Error(
        `${(e as Error).message}\nworker:\n${worker.output()}\nagent:\n${agent.output()}`,
      );
    });
  }, 120_000);

  afterAll(async () => {
    await agent?.stop();
    await worker?.stop();
    await database?.drop();
  });

  it("runs the official client's scenario against the Worker and its HostSession", async () => {
    await clientScenario(hypeman(worker.url, apiKey)).catch((e: unknown) => {
      throw new Error(`${(e as Error).message}\nworker:\n${worker.output().slice(-4000)}`);
    });
  });

  it("streams the tenant's events through the Worker, and outlives streams their clients closed", async () => {
    // A closed stream's request is torn down with its database sockets mid-use: wrangler dev's
    // Hyperdrive proxy must survive that (scripts/wrangler-socket-guard.cjs), and the place the
    // stream held is freed by its lease.
    const client = hypeman(worker.url, apiKey);
    for (let i = 0; i < 3; i++) {
      const events = await openEvents(worker.url, apiKey);
      try {
        expect(events.status).toBe(200);
        const made = await client.instances.create({ name: `evented-${i}`, image: "alpine" });
        const seen = await events.until(
          (e) =>
            e.instance_id === made.id && e.type === "instance.state" && e.data.to === "Running",
        );
        expect(seen.find((e) => e.instance_id === made.id)?.type).toBe("instance.created");
        await client.instances.delete(made.id);
      } finally {
        events.close();
      }
    }
    expect((await client.instances.list()).some((i) => i.name.startsWith("evented-"))).toBe(false);
  });

  it("serves the console from the assets binding: a browser signs in and sees the list live", async () => {
    const browser = await launchBrowser();
    try {
      const { page, errors } = await consolePage(browser);
      const redirect = await fetch(`${worker.url}/console`, { redirect: "manual" });
      expect(redirect.headers.get("location")).toMatch(/\/console\/$/);
      const index = await fetch(`${worker.url}/console/`);
      expect(index.headers.get("content-security-policy")).toContain("default-src 'self'");
      await signIn(page, worker.url, apiKey);
      await page.getByText(/^Live/).waitFor();
      const client = hypeman(worker.url, apiKey);
      const made = await client.instances.create({ name: "in-browser", image: "alpine" });
      const row = page.locator('tr[data-instance="in-browser"]');
      await expect.poll(() => row.locator(".state").textContent()).toBe("Running");
      await client.instances.delete(made.id);
      await expect.poll(() => row.count()).toBe(0);
      expect(errors).toEqual([]);
    } finally {
      await browser.close();
    }
  });

  it("captures, forks, restores and deletes a snapshot through the Worker", () =>
    snapshotScenario(hypeman(worker.url, apiKey)).catch((e: unknown) => {
      throw new Error(`${String(e)}\n--- wrangler output ---\n${worker.output()}`);
    }));

  it("pulls a private image with credentials through the Worker and its HostSession", async () => {
    const reg = await startRegistry({ private: ["secret/app"] });
    const work = mkdtempSync(path.join(os.tmpdir(), "workers-image-"));
    try {
      writeLayout(work, {
        layers: [{ entries: [file("hello", "hi")] }],
        config: { Cmd: ["/bin/sh"] },
      });
      const name = `${reg.host}/secret/app:v1`;
      await push(work, name, reg.user);
      const client = hypeman(worker.url, apiKey);
      // The credentials go from the Worker to the object to the agent, and nowhere else.
      const started = await client.images.create({ name, credentials: reg.user });
      expect(started.status).toMatch(/pending|pulling|converting|ready/);
      const done = await waitFor(
        async () => {
          const i = await client.images.get(name);
          return i.status === "ready" || i.status === "failed" ? i : undefined;
        },
        { timeoutMs: 60_000, what: "the pull through the Worker" },
      );
      expect(done).toMatchObject({ status: "ready", cmd: ["/bin/sh"], error: null });
      const stored = await database.database.db.execute(
        sql`select payload::text as p from operations where kind = 'image_pull'`,
      );
      expect((stored as unknown as unknown[]).length).toBeGreaterThan(0);
      for (const row of stored as unknown as Array<{ p: string }>) {
        expect(row.p).not.toContain(reg.user.password);
      }
      // Nor on the host's disk: the journal records the command without them.
      const journal = readFileSync(agentPaths(agent.dataDir).journal, "utf8");
      expect(journal).toContain("image_pull");
      expect(journal).not.toContain(reg.user.password);
    } finally {
      await reg.stop();
      rmSync(work, { recursive: true, force: true });
    }
  });

  it("makes volumes through the Worker, one from a tar.gz streamed to it", async () => {
    const auth = { authorization: `Bearer ${apiKey}` };
    const plain = await fetch(`${worker.url}/volumes`, {
      method: "POST",
      headers: { ...auth, "content-type": "application/json" },
      body: JSON.stringify({ id: "vol-w", name: "w", size_gb: 1 }),
    });
    expect(plain.status).toBe(201);
    const archive = gzipSync(tar([file("greeting", "hello from the worker")]));
    const seeded = await fetch(`${worker.url}/volumes/from-archive?name=s&size_gb=1&id=vol-s`, {
      method: "POST",
      headers: { ...auth, "content-type": "application/gzip" },
      body: archive,
    });
    expect(seeded.status, await seeded.clone().text()).toBe(201);
    const [row] = await database.database.db.select().from(volumes).where(eq(volumes.id, "vol-s"));
    const disk = path.join(agentPaths(agent.dataDir).volumesDir, `${row?.key}.ext4`);
    expect(await readRootfs(disk).cat("/greeting")).toBe("hello from the worker");
  });

  it("streams logs from the agent through the Durable Object", async () => {
    const res = await fetch(`${worker.url}/instances/web-1/logs?tail=1000&source=hypeman`, {
      headers: { authorization: `Bearer ${apiKey}` },
    });
    expect(res.status).toBe(200);
    expect(await res.text()).toMatch(/^data: ".*create/m);
  });

  it("streams a log of many chunks whole (the object acknowledges what its reader took)", async () => {
    const client = hypeman(worker.url, apiKey);
    const inst = await client.instances.create({ name: "w-log", image: "alpine", vcpus: 1 });
    // 3,000 lines of 1,000 characters: a dozen chunks, three times a stream's window.
    const lines = Array.from({ length: 3000 }, (_, i) => `${i} ${"w".repeat(995)}`);
    appendFileSync(agentPaths(agent.dataDir).sim.consoleLog(inst.id), `${lines.join("\n")}\n`);
    const res = await fetch(`${worker.url}/instances/w-log/logs?tail=3000`, {
      headers: { authorization: `Bearer ${apiKey}` },
    });
    expect(res.status).toBe(200);
    const got = sseData(await res.text());
    expect(got).toEqual(lines);
    await client.instances.delete(inst.id);
  });

  it("execs, stats a path and stats through the Worker and the object", async () => {
    const client = hypeman(worker.url, apiKey);
    await client.instances.create({ name: "w-exec", image: "alpine", vcpus: 1, size: "256MB" });
    const echo = await execOnce(worker.url, apiKey, "w-exec", {
      command: ["echo", "through workers"],
    }).catch((e: unknown) => {
      throw new Error(`${(e as Error).message}\nworker:\n${worker.output().slice(-4000)}`);
    });
    expect(echo).toMatchObject({ exitCode: 0, closeCode: 1000 });
    expect(echo.output.toString()).toBe("through workers\n");
    // 2 MiB through windows of 256 KiB: credit travels back from the Worker to the object.
    const big = await execOnce(worker.url, apiKey, "w-exec", {
      command: ["yes", String(2 * 1024 * 1024)],
    });
    expect(big.exitCode).toBe(0);
    expect(big.output.length).toBe(2 * 1024 * 1024);
    const cat = await execOnce(
      worker.url,
      apiKey,
      "w-exec",
      { command: ["cat"] },
      { stdin: ["a", "b"], closeStdin: true },
    );
    expect(cat.output.toString()).toBe("ab");
    expect(await client.instances.stat("w-exec", { path: "/etc" })).toMatchObject({
      exists: true,
      is_dir: true,
    });
    expect(await client.instances.stats("w-exec")).toMatchObject({
      instance_name: "w-exec",
      allocated_vcpus: 1,
    });
    await client.instances.stop("w-exec");
    await expect(execOnce(worker.url, apiKey, "w-exec", {})).rejects.toMatchObject({ status: 409 });
  });
});

// A HostSession dropped from memory mid-command. Locally the runtime does not hibernate an object
// within a test's time, so the test drops it with state.abort() (POST /__test/evict, enabled by
// SESSION_TEST_EVICT=1). That is harsher than hibernation: abort() also closes the agent's
// socket. The object has already let go of the command's request (SESSION_WAIT_MS=1000), the
// host works on a 14 s fork, the agent reconnects with the fork in flight, and the result must be
// recorded by the new instance of the object and seen by the request through Postgres.
describe("HostSession dropped mid-command (wrangler dev)", { timeout: 120_000 }, () => {
  it("records the result in a new instance of the object; the fork completes once", async () => {
    const database = await testDatabase();
    const { apiKey } = await seedTenant(database.database.db);
    const worker = await wranglerDev(database.url, {
      HEARTBEAT_MS: "60000",
      HOST_GRACE_MS: "120000",
      SESSION_WAIT_MS: "1000",
      SESSION_TEST_EVICT: "1",
    });
    const { hostId, token } = await registerHost(database.database.db);
    const agent = await spawnAgent({
      cpUrl: worker.url,
      token,
      env: { SIM_LATENCY_MS: JSON.stringify({ fork: 14_000 }) },
    });
    try {
      await hostOnline(database.database.db, hostId, 30_000);
      const client = hypeman(worker.url, apiKey);
      await client.instances.create({ name: "ev-src", image: "alpine", vcpus: 1, size: "256MB" });
      await client.instances.standby("ev-src");
      const forking = client.instances.fork("ev-src", { name: "ev-fork", target_state: "Running" });
      const forkCommand = await waitFor(() => agent.execLog().find((l) => l.kind === "fork"), {
        what: "the fork to start on the host",
      });
      // The object has let go of the request (after SESSION_WAIT_MS).
      await waitFor(
        () =>
          worker
            .output()
            .split("\n")
            .some(
              (l) =>
                l.includes('"msg":"stopped waiting for a result"') &&
                l.includes(forkCommand.command_id),
            ),
        { timeoutMs: 30_000, what: "the object to stop waiting for the fork's result" },
      );
      // Evict through a test-only path of the Worker, forwarded to the host's object.
      const evict = await fetch(`${worker.url}/__test/evict/${hostId}`, { method: "POST" });
      expect(evict.status).toBe(202); // abort() throws in the object, by design
      const fork = await forking;
      expect(fork.state).toBe("Running");
      // Which instance of the object sent the command, and which recorded its result.
      const events = worker
        .output()
        .split("\n")
        .flatMap((l) => {
          const m = /\{.*"msg":"(host session loaded|result recorded)".*\}/.exec(l);
          return m
            ? [JSON.parse(m[0]) as { msg: string; incarnation: string; waiting?: boolean }]
            : [];
        });
      const results = events.filter((e) => e.msg === "result recorded");
      const last = results.at(-1);
      expect(last?.waiting, "the result found no request waiting in memory").toBe(false);
      const loaded = events
        .filter((e) => e.msg === "host session loaded")
        .map((e) => e.incarnation);
      expect(loaded.length, "the object was loaded again after the abort").toBeGreaterThan(1);
      // The agent came back with the fork still running, and said so in its hello.
      expect(agent.output()).toMatch(
        /"msg":"hello sent","instances":1,"in_flight":\["[0-9a-f-]{36}"\]/,
      );
      expect(last?.incarnation).toBe(loaded.at(-1));
      expect(agent.execLog().filter((l) => l.kind === "fork")).toHaveLength(1);
    } finally {
      await agent.stop();
      await worker.stop();
      await database.drop();
    }
  });
});
