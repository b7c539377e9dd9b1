import { and, eq, sql } from "drizzle-orm";
import { beforeAll, describe, expect, it } from "vitest";
import { instances, operations } from "../../control-plane/src/db/schema/index.ts";
import { api, seedTenant } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

type Call = ReturnType<typeof api>;
interface Inst {
  id: string;
  name: string;
  state: string;
  [k: string]: unknown;
}

async function create(
  call: Call,
  name: string,
  extra: Record<string, unknown> = {},
): Promise<Inst> {
  const r = await call("POST", "/instances", {
    name,
    image: "docker.io/library/alpine:3.20",
    vcpus: 1,
    size: "256MB",
    ...extra,
  });
  expect(r.status, JSON.stringify(r.body)).toBe(201);
  return r.body as Inst;
}

async function rowCounts(stack: Stack) {
  const [i] = await stack.db.select({ n: sql<number>`count(*)::int` }).from(instances);
  const [o] = await stack.db.select({ n: sql<number>`count(*)::int` }).from(operations);
  return { instances: i?.n, operations: o?.n };
}

describe("fork rules (two sim hosts)", () => {
  let stack: Stack;
  let call: Call;
  beforeAll(async () => {
    stack = await startStack({ agents: [{}, {}] });
    call = api(stack.cp.url, stack.apiKey);
  });

  it("defaults target_state to the source's state at fork time", async () => {
    await create(call, "d-stopped");
    await call("POST", "/instances/d-stopped/stop");
    await create(call, "d-standby");
    await call("POST", "/instances/d-standby/standby");
    await create(call, "d-running");
    for (const [src, want] of [
      ["d-stopped", "Stopped"],
      ["d-standby", "Standby"],
      ["d-running", "Running"],
    ]) {
      const r = await call("POST", `/instances/${src}/fork`, {
        name: `${src}-f`,
        from_running: true,
      });
      expect(r.status, JSON.stringify(r.body)).toBe(201);
      expect((r.body as Inst).state).toBe(want);
    }
  });

  it("refuses a Running source without from_running: 409 invalid_state, nothing written", async () => {
    await create(call, "r-src");
    const before = await rowCounts(stack);
    const r = await call("POST", "/instances/r-src/fork", { name: "r-src-f" });
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({ code: "invalid_state" });
    expect((r.body as { message: string }).message).toMatch(/from_running/);
    expect(await rowCounts(stack)).toEqual(before);
    expect((await call("GET", "/instances/r-src")).body).toMatchObject({ state: "Running" });
  });

  it("from_running: source goes to standby, is forked, and is Running again", async () => {
    const src = await create(call, "fr-src");
    const r = await call("POST", "/instances/fr-src/fork", { name: "fr-fork", from_running: true });
    expect(r.status, JSON.stringify(r.body)).toBe(201);
    expect((r.body as Inst).state).toBe("Running");
    expect((await call("GET", "/instances/fr-src")).body).toMatchObject({ state: "Running" });
    // The host saw exactly standby(source) → fork → restore(source), in that order.
    const log = stack.agents.flatMap((a) => a.execLog());
    const mine = log.filter(
      (l) =>
        l.instance_id === src.id || (l.kind === "fork" && l.instance_id === (r.body as Inst).id),
    );
    expect(mine.map((l) => l.kind)).toEqual(["create", "standby", "fork", "restore"]);
  });

  it("gives the fork a new identity and inherits the source's settings", async () => {
    expect((await call("POST", "/volumes", { id: "vol-ro", name: "ro", size_gb: 1 })).status).toBe(
      201,
    );
    const src = await create(call, "id-src", {
      env: { A: "1" },
      tags: { team: "x" },
      vcpus: 2,
      size: "512MB",
      hotplug_size: "256MB",
      overlay_size: "2GB",
      disk_io_bps: "50MB/s",
      network: { bandwidth_download: "1Gbps", bandwidth_upload: "10MB/s" },
      volumes: [{ volume_id: "vol-ro", mount_path: "/data", readonly: true }],
    });
    await call("POST", "/instances/id-src/stop");
    const r = await call("POST", "/instances/id-src/fork", { name: "id-fork" });
    expect(r.status, JSON.stringify(r.body)).toBe(201);
    type Net = { network: { ip: string; mac: string; bandwidth_download: string } };
    const f = r.body as Inst & Net;
    const s = src as Inst & Net;
    expect(f.id).not.toBe(s.id);
    expect(f.id).toMatch(/^[a-z0-9]{24}$/);
    expect(f.name).toBe("id-fork");
    expect(f.network.mac).not.toBe(s.network.mac);
    expect(f.network.ip).not.toBe(s.network.ip);
    expect(Date.parse(f.created_at as string)).toBeGreaterThanOrEqual(
      Date.parse(s.created_at as string),
    );
    for (const k of [
      "image",
      "env",
      "vcpus",
      "size",
      "hotplug_size",
      "overlay_size",
      "disk_io_bps",
      "tags",
      "volumes",
      "hypervisor",
    ]) {
      expect(f[k], k).toEqual(s[k]);
    }
    expect(f.network.bandwidth_download).toBe(s.network.bandwidth_download);
    // Placed on the source's host.
    const rows = await stack.db
      .select({ id: instances.id, hostId: instances.hostId })
      .from(instances)
      .where(sql`${instances.id} in (${s.id}, ${f.id})`);
    expect(new Set(rows.map((x) => x.hostId)).size).toBe(1);
  });

  it("places every fork on its source's host, whichever host that is", async () => {
    // Two hosts; running sources fill the emptier host first, so both get some. Then fork each.
    const names = ["h-a", "h-b", "h-c", "h-d"];
    for (const n of names) await create(call, n, { size: "16GB" });
    for (const n of names) {
      expect((await call("POST", `/instances/${n}/stop`)).status).toBe(200);
      expect((await call("POST", `/instances/${n}/fork`, { name: `${n}-f` })).status).toBe(201);
    }
    const rows = await stack.db
      .select({ name: instances.name, hostId: instances.hostId })
      .from(instances);
    const host = new Map(rows.map((r) => [r.name, r.hostId]));
    expect(new Set(names.map((n) => host.get(n))).size).toBe(2);
    for (const n of names) expect(host.get(`${n}-f`), n).toBe(host.get(n));
  });

  it("refuses a writable volume with 409 naming it; nothing written", async () => {
    expect((await call("POST", "/volumes", { id: "vol-rw", name: "rw", size_gb: 1 })).status).toBe(
      201,
    );
    await create(call, "wv-src", { volumes: [{ volume_id: "vol-rw", mount_path: "/data" }] });
    await call("POST", "/instances/wv-src/stop");
    const before = await rowCounts(stack);
    const r = await call("POST", "/instances/wv-src/fork", { name: "wv-f" });
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({ code: "conflict" });
    expect((r.body as { message: string }).message).toMatch(/volume vol-rw is attached writable/);
    expect(await rowCounts(stack)).toEqual(before);
  });

  it("rejects a taken name with 409 name_conflict", async () => {
    await create(call, "nc-src");
    await call("POST", "/instances/nc-src/stop");
    const r = await call("POST", "/instances/nc-src/fork", { name: "nc-src" });
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({ code: "name_conflict" });
  });

  it("lets exactly one of two forks racing for one name win", async () => {
    await create(call, "race-src");
    await call("POST", "/instances/race-src/standby");
    for (let round = 0; round < 3; round++) {
      const name = `race-${round}`;
      const rs = await Promise.all(
        [1, 2, 3].map(() => call("POST", "/instances/race-src/fork", { name })),
      );
      const codes = rs.map((r) => r.status).sort();
      expect(codes, JSON.stringify(rs.map((r) => r.body))).toEqual([201, 409, 409]);
      for (const r of rs.filter((x) => x.status === 409))
        expect(r.body).toMatchObject({ code: "name_conflict" });
      const rows = await stack.db.select().from(instances).where(eq(instances.name, name));
      expect(rows.length).toBe(1);
    }
  });

  it("lets exactly one of two racing lifecycle calls apply; the other gets 409 invalid_state", async () => {
    await create(call, "lc-src");
    const rs = await Promise.all([
      call("POST", "/instances/lc-src/stop"),
      call("POST", "/instances/lc-src/standby"),
    ]);
    const ok = rs.filter((r) => r.status === 200);
    const lost = rs.filter((r) => r.status === 409);
    expect(ok.length, JSON.stringify(rs.map((r) => r.body))).toBe(1);
    expect(lost.length).toBe(1);
    expect(lost[0]?.body).toMatchObject({ code: "invalid_state" });
    expect(lost[0]?.headers.get("x-should-retry")).toBe("false");
  });

  it("keeps tenants apart: another tenant's instance is a 404 for every verb", async () => {
    await create(call, "t-src");
    const other = await seedTenant(stack.db, "tenant-b");
    const them = api(stack.cp.url, other.apiKey);
    for (const [m, p] of [
      ["GET", "/instances/t-src"],
      ["POST", "/instances/t-src/stop"],
      ["POST", "/instances/t-src/fork"],
      ["DELETE", "/instances/t-src"],
    ] as const) {
      const r = await them(m, p, p.endsWith("fork") ? { name: "stolen" } : undefined);
      expect(r.status, `${m} ${p}`).toBe(404);
      expect(r.body).toMatchObject({ code: "not_found" });
    }
    expect((await them("GET", "/instances")).body).toEqual([]);
    // Names are per tenant: tenant B may use the same name.
    expect(
      (
        await them("POST", "/instances", {
          name: "t-src",
          image: "alpine",
          vcpus: 1,
          size: "256MB",
        })
      ).status,
    ).toBe(201);
    expect((await call("GET", "/instances/t-src")).body).toMatchObject({ state: "Running" });
    const rows = await stack.db
      .select()
      .from(instances)
      .where(and(eq(instances.name, "t-src")));
    expect(rows.length).toBe(2);
  });

  it("answers 409 ambiguous for a prefix that matches several ids", async () => {
    for (let i = 0; i < 40; i++) await create(call, `amb-${i}`);
    const all = ((await call("GET", "/instances")).body as Inst[]).map((x) => x.id);
    expect(all.length).toBeGreaterThanOrEqual(40);
    // At least 40 ids over at most 36 first characters: some character is shared.
    const shared = [...new Set(all.map((x) => x[0]))].find(
      (c) => all.filter((x) => x[0] === c).length > 1,
    );
    expect(shared, `no first character shared by two of ${all.join(" ")}`).toMatch(/^[a-z0-9]$/);
    const r = await call("GET", `/instances/${shared}`);
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({ code: "ambiguous" });
  });
});

describe("fork failures on the host", () => {
  it("restores the source even when the fork fails, reports the error, leaves no fork", async () => {
    const stack = await startStack({
      agents: [{ SIM_FAIL: JSON.stringify({ fork: "insufficient_resources" }) }],
    });
    const call = api(stack.cp.url, stack.apiKey);
    await create(call, "ff-src");
    const r = await call("POST", "/instances/ff-src/fork", { name: "ff-f", from_running: true });
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({ code: "insufficient_resources" });
    expect((await call("GET", "/instances/ff-src")).body).toMatchObject({ state: "Running" });
    expect((await call("GET", "/instances/ff-f")).status).toBe(404);
    const kinds = stack.agents[0]?.execLog().map((l) => l.kind);
    expect(kinds).toEqual(["create", "standby", "fork", "restore"]);
  });

  it("rolls the fork back when the source cannot be restored, and reports both errors", async () => {
    const stack = await startStack({
      agents: [{ SIM_FAIL: JSON.stringify({ restore: "internal_error" }) }],
    });
    const call = api(stack.cp.url, stack.apiKey);
    await create(call, "rf-src");
    const r = await call("POST", "/instances/rf-src/fork", { name: "rf-f", from_running: true });
    expect(r.status).toBe(500);
    expect((r.body as { message: string }).message).toMatch(/restor/);
    expect((await call("GET", "/instances/rf-f")).status).toBe(404);
    const kinds = stack.agents[0]?.execLog().map((l) => l.kind);
    expect(kinds).toEqual(["create", "standby", "fork", "restore", "delete"]);
    const rows = await stack.db.select().from(instances).where(eq(instances.name, "rf-f"));
    expect(rows).toEqual([]);
  });

  it("reports both errors when the fork and the source's restore both fail", async () => {
    const stack = await startStack({
      agents: [
        { SIM_FAIL: JSON.stringify({ fork: "insufficient_resources", restore: "internal_error" }) },
      ],
    });
    const call = api(stack.cp.url, stack.apiKey);
    await create(call, "bf-src");
    const r = await call("POST", "/instances/bf-src/fork", { name: "bf-f", from_running: true });
    expect(r.status).toBe(409);
    const { code, message } = r.body as { code: string; message: string };
    expect(code).toBe("insufficient_resources");
    expect(message).toMatch(/insufficient_resources|fork/);
    expect(message).toMatch(/restoring the source failed too/);
    expect((await call("GET", "/instances/bf-f")).status).toBe(404);
    // The source stays in Standby (its snapshot intact), to be restored by hand.
    expect((await call("GET", "/instances/bf-src")).body).toMatchObject({ state: "Standby" });
  });
});
