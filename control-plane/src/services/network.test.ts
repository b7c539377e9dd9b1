// Guest subnets and addresses, on both databases the control plane runs on.
import { InsufficientResourcesError } from "@offshoot/shared";
import { eq, sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  databaseBackends,
  instanceValues,
  registerHost,
  seedTenant,
} from "../../../test/harness.ts";
import { type Db, pgErrorCode, transaction } from "../db/client.ts";
import { hosts, instances } from "../db/schema/index.ts";
import { allocateIp, freeAddress, GUEST_SUBNET_PREFIX } from "./network.ts";

describe.each(databaseBackends)("guest addresses (%s)", (_name, open) => {
  let db: Db;
  let close: () => Promise<void>;
  let tenantId: string;
  let n = 0;

  beforeAll(async () => {
    ({ db, close } = await open());
    tenantId = (await seedTenant(db)).tenantId;
  });
  afterAll(() => close());

  const subnetOf = async (hostId: string) => {
    const [h] = await db.select({ subnet: hosts.subnet }).from(hosts).where(eq(hosts.id, hostId));
    return h?.subnet ?? "";
  };
  /** A new host and the addresses `offsets` into its subnet, taken by instances. */
  const hostWith = async (offsets: number[]) => {
    const { hostId } = await registerHost(db);
    const base = ipNum((await subnetOf(hostId)).split("/")[0] ?? "");
    if (offsets.length > 0) {
      await db.insert(instances).values(
        offsets.map((k) =>
          instanceValues(tenantId, hostId, `ip${++n}`, {
            networkEnabled: true,
            ip: numIp(base + k),
          }),
        ),
      );
    }
    return { hostId, base };
  };
  const next = async (hostId: string) => {
    const ip = await transaction(db, (tx) => allocateIp(tx, hostId));
    return ipNum(ip) - ipNum((await subnetOf(hostId)).split("/")[0] ?? "");
  };

  it("gives each host its own subnet of the pool, none overlapping", async () => {
    const ids = await Promise.all(Array.from({ length: 6 }, () => registerHost(db)));
    const subnets = await Promise.all(ids.map((h) => subnetOf(h.hostId)));
    for (const s of subnets)
      expect(s).toMatch(new RegExp(`^10\\.\\d+\\.\\d+\\.0/${GUEST_SUBNET_PREFIX}$`));
    expect(new Set(subnets).size).toBe(subnets.length);
    // Registered again (a new token), a host keeps its subnet.
    const [first] = await db
      .select()
      .from(hosts)
      .where(eq(hosts.id, ids[0]?.hostId ?? ""));
    await registerHost(db, first?.name);
    expect(await subnetOf(first?.id ?? "")).toBe(subnets[0]);
  });

  it("refuses a subnet overlapping another host's (exclusion constraint)", async () => {
    const { hostId } = await registerHost(db);
    const taken = await subnetOf(hostId);
    const inside = `${taken.split("/")[0]}/${GUEST_SUBNET_PREFIX + 2}`;
    const err = await db
      .insert(hosts)
      .values({ name: `overlap-${++n}`, tokenHash: `t${n}`, subnet: inside })
      .catch((e: unknown) => e);
    expect(pgErrorCode(err)).toEqual({ code: "23P01", constraint: "hosts_subnet_no_overlap" });
  });

  it("starts after the host's bridge address and takes the lowest gap", async () => {
    expect(await next((await hostWith([])).hostId)).toBe(2);
    expect(await next((await hostWith([2, 3, 10, 5])).hostId)).toBe(4);
    expect(await next((await hostWith([3])).hostId)).toBe(2);
  });

  it("counts across octets and past hundreds of instances", async () => {
    const offsets = Array.from({ length: 400 }, (_, i) => i + 2);
    expect(await next((await hostWith(offsets)).hostId)).toBe(402);
  });

  it("ignores other hosts' addresses", async () => {
    await hostWith([2]);
    expect(await next((await hostWith([])).hostId)).toBe(2);
  });

  it("refuses with insufficient_resources when the host's subnet is full", async () => {
    const { hostId, base } = await hostWith([]);
    const last = 2 ** (32 - GUEST_SUBNET_PREFIX) - 2;
    await db.execute(sql`
      insert into instances (id, tenant_id, host_id, name, image, hypervisor, state, vcpus,
        memory_bytes, overlay_bytes, network_enabled, ip)
      select 'full' || ${base} || '-' || k, ${tenantId}, ${hostId}, 'full' || ${base} || '-' || k,
        'alpine', 'qemu', 'Stopped', 1, 268435456, 1073741824, true, host(${numIp(base)}::inet + k)
      from generate_series(2, ${last}) k`);
    const err = await next(hostId).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InsufficientResourcesError);
    expect(String(err)).toMatch(/no free guest address/);
  });

  it("gives concurrent creates on one host distinct addresses (they queue on the host row)", async () => {
    const { hostId } = await hostWith([]);
    const create = (k: number) =>
      transaction(db, async (tx) => {
        await tx.execute(sql`select id from hosts where id = ${hostId} for update`);
        const ip = await allocateIp(tx, hostId);
        await tx
          .insert(instances)
          .values(instanceValues(tenantId, hostId, `c${k}-${++n}`, { networkEnabled: true, ip }));
        return ip;
      });
    const ips = await Promise.all(Array.from({ length: 12 }, (_, k) => create(k)));
    expect(new Set(ips).size).toBe(12);
  });

  it("refuses a second holder of an address even without the host lock (unique index)", async () => {
    const { hostId } = await hostWith([]);
    const ip = await transaction(db, (tx) => freeAddress(tx, hostId));
    await db
      .insert(instances)
      .values(instanceValues(tenantId, hostId, `u${++n}`, { networkEnabled: true, ip }));
    const err = await db
      .insert(instances)
      .values(instanceValues(tenantId, hostId, `u${++n}`, { networkEnabled: true, ip }))
      .catch((e: unknown) => e);
    expect(pgErrorCode(err)).toEqual({ code: "23505", constraint: "instances_host_ip_uq" });
  });
});

function ipNum(ip: string): number {
  return ip.split(".").reduce((a, o) => a * 256 + Number(o), 0);
}

function numIp(v: number): string {
  return [24, 16, 8, 0].map((s) => Math.floor(v / 2 ** s) % 256).join(".");
}
