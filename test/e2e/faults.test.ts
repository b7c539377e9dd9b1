import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { eq } from "drizzle-orm";
import { describe, expect, it } from "vitest";
import { instances, operations } from "../../control-plane/src/db/schema/index.ts";
import { api, hostOnline, waitFor } from "../harness.ts";
import { startStack } from "./env.ts";

const simInstances = (dataDir: string) => {
  const dir = join(dataDir, "sim", "instances");
  return existsSync(dir) ? readdirSync(dir) : [];
};

// Waits for convergence take as long as they take on a loaded machine; their timeouts only
// catch what never converges (how fast it converges is a benchmark's business).
const CONVERGE_MS = 60_000;

describe("faults", { timeout: 180_000 }, () => {
  it("kill -9 of the agent mid-fork: the fork completes or rolls back, never twice, and state converges", async () => {
    const stack = await startStack({
      agents: [{ SIM_LATENCY_MS: JSON.stringify({ fork: 1500 }) }],
    });
    const call = api(stack.cp.url, stack.apiKey);
    const agent = stack.agents[0];
    if (!agent) throw new Error("no agent");
    expect(
      (
        await call("POST", "/instances", {
          name: "k-src",
          image: "alpine",
          vcpus: 1,
          size: "256MB",
        })
      ).status,
    ).toBe(201);
    expect((await call("POST", "/instances/k-src/standby")).status).toBe(200);

    const pending = call("POST", "/instances/k-src/fork", {
      name: "k-fork",
      target_state: "Running",
    });
    await waitFor(() => agent.execLog().some((l) => l.kind === "fork"), {
      what: "fork to start on the host",
    });
    await agent.kill("SIGKILL");
    await agent.restart();
    await hostOnline(stack.db, stack.hostIds[0] ?? "", CONVERGE_MS);
    const r = await pending;

    const forkRows = await waitFor(
      async () => {
        const rows = await stack.db.select().from(instances).where(eq(instances.name, "k-fork"));
        const onHost = simInstances(agent.dataDir);
        const settled =
          r.status === 201
            ? rows[0]?.state === "Running" && onHost.includes(rows[0].id)
            : rows.length === 0;
        return settled ? { rows, onHost } : undefined;
      },
      { timeoutMs: CONVERGE_MS, what: "fork state to converge" },
    );
    expect([201, 500], JSON.stringify(r.body)).toContain(r.status);
    // Never duplicated: the host ran the fork command once, and holds at most the source
    // plus one fork.
    const forks = agent.execLog().filter((l) => l.kind === "fork");
    expect(forks.length).toBe(1);
    expect(forkRows.onHost.length).toBe(r.status === 201 ? 2 : 1);
    expect((await call("GET", "/instances/k-src")).body).toMatchObject({ state: "Standby" });
    // And the instance is usable afterwards.
    const again = await call("POST", "/instances/k-src/fork", { name: "k-fork-2" });
    expect(again.status, JSON.stringify(again.body)).toBe(201);
  });

  it("restart of the control plane with agents connected: they reconnect, no command lost or run twice", async () => {
    const stack = await startStack({
      agents: [{ SIM_LATENCY_MS: JSON.stringify({ stop: 1500 }) }],
    });
    const call = api(stack.cp.url, stack.apiKey);
    const agent = stack.agents[0];
    if (!agent) throw new Error("no agent");
    const created = await call("POST", "/instances", {
      name: "c-1",
      image: "alpine",
      vcpus: 1,
      size: "256MB",
    });
    expect(created.status).toBe(201);
    const id = (created.body as { id: string }).id;

    const inFlight = call("POST", "/instances/c-1/stop").catch((e: unknown) => e);
    await waitFor(() => agent.execLog().some((l) => l.kind === "stop"), {
      what: "stop to start on the host",
    });
    await stack.cp.kill("SIGKILL");
    await inFlight; // the request dies with the process; the command must not.
    await stack.cp.restart();

    // The hello's inventory may show Stopped a moment before the re-sent stop is answered from
    // the journal; both must land.
    const ops = await waitFor(
      async () => {
        const [row] = await stack.db.select().from(instances).where(eq(instances.id, id));
        const ops = await stack.db.select().from(operations).where(eq(operations.instanceId, id));
        return row?.state === "Stopped" && ops.every((o) => o.status !== "pending")
          ? ops
          : undefined;
      },
      { timeoutMs: CONVERGE_MS, what: "the stop to be recorded after the restart" },
    );
    expect(ops.map((o) => `${o.kind}:${o.status}`).sort()).toEqual([
      "create:succeeded",
      "stop:succeeded",
    ]);
    const stops = agent.execLog().filter((l) => l.kind === "stop");
    expect(stops.length).toBe(1);
    // The reconnected agent takes new commands.
    expect((await call("POST", "/instances/c-1/start")).status).toBe(200);
  });

  it("a silent host's instances show Unknown with state_error, and converge when it returns", async () => {
    const stack = await startStack({ cpEnv: { HOST_GRACE_MS: "3000" } });
    const call = api(stack.cp.url, stack.apiKey);
    const agent = stack.agents[0];
    if (!agent) throw new Error("no agent");
    expect(
      (await call("POST", "/instances", { name: "u-1", image: "alpine", vcpus: 1, size: "256MB" }))
        .status,
    ).toBe(201);
    await agent.kill("SIGKILL");
    const unknown = await waitFor(
      async () => {
        const r = await call("GET", "/instances/u-1");
        const b = r.body as { state: string; state_error: string | null };
        return b.state === "Unknown" ? b : undefined;
      },
      { timeoutMs: CONVERGE_MS, what: "Unknown" },
    );
    expect(unknown.state_error).toMatch(/has not been heard from/);
    // Only delete is allowed in Unknown.
    expect((await call("POST", "/instances/u-1/stop")).status).toBe(409);
    await agent.restart();
    await waitFor(
      async () =>
        ((await call("GET", "/instances/u-1")).body as { state: string }).state === "Running",
      { timeoutMs: CONVERGE_MS, what: "Running again" },
    );
    expect(
      ((await call("GET", "/instances/u-1")).body as { state_error: unknown }).state_error,
    ).toBeNull();
  });
});
