// Transactions on a Postgres server through connectPostgres: BEGIN is pipelined with the first
// statement, so what a transaction guarantees is checked here, not assumed.
import { eq, sql } from "drizzle-orm";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { databaseBackends, seedTenant, testDatabase } from "../../../test/harness.ts";
import {
  type Db,
  issued,
  pgErrorCode,
  statement,
  transaction,
  transactionEndingWith,
} from "./client.ts";
import { tenants } from "./schema/index.ts";

describe("transactions (Postgres server)", () => {
  let db: Db;
  let drop: () => Promise<void>;
  beforeAll(async () => {
    const t = await testDatabase();
    db = t.database.db;
    drop = t.drop;
  });
  afterAll(() => drop());

  const named = async (name: string) =>
    (await db.select().from(tenants).where(eq(tenants.name, name))).length;

  it("commits every statement, or none when one fails, and reports the statement's error", async () => {
    await transaction(db, (tx) => tx.insert(tenants).values({ name: "tx-a" }));
    expect(await named("tx-a")).toBe(1);

    const err = await transaction(db, async (tx) => {
      await tx.insert(tenants).values({ name: "tx-b" });
      await tx.insert(tenants).values({ name: "tx-a" }); // duplicate name
    }).catch((e: unknown) => e);
    expect(pgErrorCode(err).code).toBe("23505");
    expect(await named("tx-b")).toBe(0);

    // Statements issued together: the first failure is the one reported.
    const both = await transaction(db, async (tx) => {
      await Promise.all([
        tx.insert(tenants).values({ name: "tx-a" }),
        tx.insert(tenants).values({ name: "tx-c" }),
      ]);
    }).catch((e: unknown) => e);
    expect(pgErrorCode(both).code).toBe("23505");
    expect(await named("tx-c")).toBe(0);
  });

  it("rolls back when the code inside throws", async () => {
    await expect(
      transaction(db, async (tx) => {
        await tx.insert(tenants).values({ name: "tx-d" });
        throw new Error("changed my mind");
      }),
    ).rejects.toThrow("changed my mind");
    expect(await named("tx-d")).toBe(0);
  });

  it("runs every statement of a transaction inside it, also when many run at once", async () => {
    const { tenantId } = await seedTenant(db);
    // Each transaction keeps one transaction id throughout, and none shares it.
    const runs = await Promise.all(
      Array.from({ length: 25 }, (_, i) =>
        transaction(db, async (tx) => {
          const [first] = await statement(tx, sql`select txid_current()::text as xid`);
          await tx
            .update(tenants)
            .set({ name: `tx-many-${i}` })
            .where(eq(tenants.id, i === 0 ? tenantId : "none"));
          const [again] = await statement(tx, sql`select txid_current()::text as xid`);
          return [first?.xid, again?.xid];
        }),
      ),
    );
    for (const [a, b] of runs) expect(a).toBe(b);
    expect(new Set(runs.map(([a]) => a)).size).toBe(25);
    expect(await named("tx-many-0")).toBe(1);
  });
});

describe.each(databaseBackends)(
  "a transaction ending with statements it does not await (%s)",
  (_, open) => {
    let db: Db;
    let close: () => Promise<void>;
    beforeAll(async () => {
      ({ db, close } = await open());
      await db.insert(tenants).values({ name: "taken" });
    });
    afterAll(() => close());

    const named = async (name: string) =>
      (await db.select().from(tenants).where(eq(tenants.name, name))).length;
    const ending = (names: string[]) =>
      transactionEndingWith(db, async (tx) => {
        await tx.insert(tenants).values({ name: `${names[0]}-first` });
        return {
          value: "done",
          last: names.map((name) => issued(tx.insert(tenants).values({ name }).execute())),
        };
      });

    it("commits them", async () => {
      expect(await ending(["e-a", "e-b"])).toBe("done");
      expect(await named("e-a-first")).toBe(1);
      expect(await named("e-b")).toBe(1);
    });

    it("rolls everything back when one fails, and rejects with its error", async () => {
      const err = await ending(["e-c", "taken", "e-d"]).catch((e: unknown) => e);
      expect(pgErrorCode(err).code).toBe("23505");
      for (const name of ["e-c-first", "e-c", "e-d"]) expect(await named(name)).toBe(0);
    });
  },
);

describe.each(databaseBackends)("a statement outside a transaction (%s)", (_, open) => {
  let db: Db;
  let close: () => Promise<void>;
  beforeAll(async () => ({ db, close } = await open()));
  afterAll(() => close());

  it("is not part of a transaction open meanwhile, nor sees its rows", async () => {
    const named = async (name: string) =>
      (await db.select().from(tenants).where(eq(tenants.name, name))).length;
    let inserted!: () => void;
    const ready = new Promise<void>((r) => {
      inserted = r;
    });
    let release!: () => void;
    const held = new Promise<void>((r) => {
      release = r;
    });
    const rolledBack = transaction(db, async (tx) => {
      await tx.insert(tenants).values({ name: "open-inside" });
      inserted();
      await held;
      throw new Error("rolled back");
    }).catch((e: unknown) => e);
    await ready;
    // Issued while the transaction is open: on its own, it must neither join the transaction
    // (and be rolled back with it) nor see the transaction's uncommitted row.
    const outside = db.insert(tenants).values({ name: "open-outside" });
    const seen = named("open-inside");
    release();
    await outside;
    expect(await seen).toBe(0);
    expect(String(await rolledBack)).toMatch(/rolled back/);
    expect(await named("open-outside")).toBe(1);
    expect(await named("open-inside")).toBe(0);
  });
});
