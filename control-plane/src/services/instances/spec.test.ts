// Guest address allocation on both databases the control plane runs on.
import { InsufficientResourcesError } from "@offshoot/shared";
import { sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  databaseBackends,
  instanceValues,
  registerHost,
  seedTenant,
} from "../../../../test/harness.ts";
import { type Db, transaction } from "../../db/client.ts";
import { instances } from "../../db/schema/index.ts";
import { allocateIp } from "./spec.ts";

describe.each(databaseBackends)("allocateIp (%s)", (_name, open) => {
  let db: Db;
  let close: () => Promise<void>;
  let tenantId: string;
  let n = 0;

  beforeAll(async () => {
    ({ db, close } = await open());
    tenantId = (await seedTenant(db)).tenantId;
  });
  afterAll(() => close());

  const withIps = async (ips: string[]) => {
    const { hostId } = await registerHost(db);
    if (ips.length === 0) return hostId;
    await db
      .insert(instances)
      .values(
        ips.map((ip) => instanceValues(tenantId, hostId, `ip${++n}`, { networkEnabled: true, ip })),
      );
    return hostId;
  };
  const next = (hostId: string) => transaction(db, (tx) => allocateIp(tx, hostId));
  const range = (from: number, count: number) =>
    Array.from({ length: count }, (_, i) => {
      const k = from + i;
      return `10.100.${k >> 8}.${k & 255}`;
    });

  it("starts after the host's bridge address", async () => {
    expect(await next(await withIps([]))).toBe("10.100.0.2");
  });

  it("takes the lowest gap, wherever the addresses are in text order", async () => {
    expect(
      await next(await withIps(["10.100.0.2", "10.100.0.3", "10.100.0.10", "10.100.0.5"])),
    ).toBe("10.100.0.4");
    expect(await next(await withIps(["10.100.0.3"]))).toBe("10.100.0.2");
  });

  it("counts across octets and past hundreds of instances", async () => {
    expect(await next(await withIps(range(2, 400)))).toBe("10.100.1.146"); // offset 402
  });

  it("refuses with insufficient_resources when the host's /16 is full", async () => {
    const hostId = await withIps([]);
    await db.execute(sql`
      insert into instances (id, tenant_id, host_id, name, image, hypervisor, state, vcpus,
        memory_bytes, overlay_bytes, network_enabled, ip)
      select 'full' || n, ${tenantId}, ${hostId}, 'full' || n, 'alpine', 'qemu', 'Stopped', 1,
        268435456, 1073741824, true, host('10.100.0.0'::inet + n)
      from generate_series(2, 65534) n`);
    const err = await next(hostId).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InsufficientResourcesError);
    expect(String(err)).toMatch(/no free guest address/);
  });

  it("ignores other hosts' addresses", async () => {
    await withIps(["10.100.0.2"]);
    expect(await next(await withIps([]))).toBe("10.100.0.2");
  });
});
