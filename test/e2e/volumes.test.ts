// Volumes through the API, with real agent processes (sim driver: the volume files are real,
// the guests simulated): the resource, the attach rules at create, placement on the volume's
// host, and deletes. What a guest sees on a volume is in volumes-qemu.test.ts.
import { randomBytes } from "node:crypto";
import { existsSync, readdirSync } from "node:fs";
import path from "node:path";
import { createGzip, gzipSync } from "node:zlib";
import { eq, sql } from "drizzle-orm";
import { beforeAll, describe, expect, it } from "vitest";
import { instances, volumes } from "../../control-plane/src/db/schema/index.ts";
import { agentPaths } from "../../host-agent/src/paths.ts";
import { readRootfs } from "../../host-agent/testing/rootfs.ts";
import { dir, file, tar, tarHeader } from "../../scripts/oci-layout.ts";
import { api, seedTenant, waitFor } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

const ARCHIVE_LIMIT = 4 * 1024 * 1024;

describe("volumes", { timeout: 120_000 }, () => {
  let stack: Stack;
  let call: ReturnType<typeof api>;
  const create = (name: string, volumes: unknown[]) =>
    call("POST", "/instances", { name, image: "docker.io/library/alpine:latest", volumes });

  beforeAll(async () => {
    stack = await startStack({
      agents: [{ AGENT_MEMORY: "8GB" }, { AGENT_MEMORY: "4GB" }],
      cpEnv: { VOLUME_ARCHIVE_MAX_BYTES: String(ARCHIVE_LIMIT) },
    });
    call = api(stack.cp.url, stack.apiKey);
  }, 120_000);

  it("creates, lists, gets and refuses bad or taken ones", async () => {
    const r = await call("POST", "/volumes", {
      id: "vol-a",
      name: "a",
      size_gb: 1,
      tags: { t: "1" },
    });
    expect(r).toMatchObject({
      status: 201,
      body: { id: "vol-a", name: "a", size_gb: 1, attachments: [], tags: { t: "1" } },
    });
    const generated = await call("POST", "/volumes", { name: "b", size_gb: 2 });
    expect(generated.status).toBe(201);
    expect((generated.body as { id: string }).id).toMatch(/^vol-[a-z0-9]+$/);
    expect(
      await call("POST", "/volumes", { id: "vol-a", name: "again", size_gb: 1 }),
    ).toMatchObject({
      status: 409,
      body: { code: "conflict" },
    });
    for (const bad of [
      { name: "z", size_gb: 0 },
      { name: "z", size_gb: 100_000 },
      { name: "z", size_gb: 1, id: "../etc" },
      { name: "", size_gb: 1 },
    ]) {
      expect((await call("POST", "/volumes", bad)).status, JSON.stringify(bad)).toBe(400);
    }
    expect((await call("GET", "/volumes?tags[t]=1")).body).toEqual([
      expect.objectContaining({ id: "vol-a" }),
    ]);
    expect((await call("GET", "/volumes/vol-a")).body).toMatchObject({ id: "vol-a" });
    // Another tenant sees none of them.
    const other = api(stack.cp.url, (await seedTenant(stack.db)).apiKey);
    expect((await other("GET", "/volumes")).body).toEqual([]);
    expect((await other("GET", "/volumes/vol-a")).status).toBe(404);
    expect((await other("DELETE", "/volumes/vol-a")).status).toBe(404);
  });

  it("checks mount paths and overlay settings, writing nothing when refused", async () => {
    await call("POST", "/volumes", { id: "vol-p", name: "p", size_gb: 1 });
    const cases: Array<[unknown[], number, RegExp]> = [
      [[{ volume_id: "vol-p", mount_path: "//" }], 400, /would hide the image.s root/],
      [[{ volume_id: "vol-p", mount_path: "/proc/x" }], 400, /under \/proc/],
      [[{ volume_id: "vol-p", mount_path: "/dev" }], 400, /under \/dev/],
      [[{ volume_id: "vol-p", mount_path: "/a/../sys" }], 400, /must not contain/],
      [[{ volume_id: "vol-p", mount_path: "data" }], 400, /absolute/],
      [
        [
          { volume_id: "vol-p", mount_path: "/d", readonly: true },
          { volume_id: "vol-p", mount_path: "/d/", readonly: true },
        ],
        400,
        /used twice/,
      ],
      [
        [{ volume_id: "vol-p", mount_path: "/d", overlay: true, overlay_size: "1GB" }],
        400,
        /requires readonly/,
      ],
      [
        [{ volume_id: "vol-p", mount_path: "/d", readonly: true, overlay: true }],
        400,
        /overlay_size/,
      ],
      [[{ volume_id: "vol-none", mount_path: "/d" }], 404, /vol-none not found/],
    ];
    for (const [volumes, status, message] of cases) {
      const r = await create("bad-mount", volumes);
      expect(r.status, JSON.stringify(volumes)).toBe(status);
      expect((r.body as { message: string }).message).toMatch(message);
      expect((await call("GET", "/instances/bad-mount")).status).toBe(404);
    }
  });

  it("attaches writable once, read-only many times, on the volume's host", async () => {
    await call("POST", "/volumes", { id: "vol-w", name: "w", size_gb: 1 });
    await call("POST", "/volumes", { id: "vol-r", name: "r", size_gb: 1 });
    expect((await create("w1", [{ volume_id: "vol-w", mount_path: "/data" }])).status).toBe(201);
    const again = await create("w2", [{ volume_id: "vol-w", mount_path: "/data", readonly: true }]);
    expect(again).toMatchObject({ status: 409, body: { code: "conflict" } });
    expect((again.body as { message: string }).message).toMatch(/attached writable/);
    for (const n of ["r1", "r2"]) {
      expect(
        (await create(n, [{ volume_id: "vol-r", mount_path: "/data", readonly: true }])).status,
      ).toBe(201);
    }
    expect((await create("r3", [{ volume_id: "vol-r", mount_path: "/data" }])).status).toBe(409);
    const vol = (await call("GET", "/volumes/vol-r")).body as { attachments: unknown[] };
    expect(vol.attachments).toHaveLength(2);
    expect(vol.attachments).toContainEqual(
      expect.objectContaining({ mount_path: "/data", readonly: true }),
    );
    // The instance's API shape carries the mount as asked, and it runs where the volume is.
    const w1 = (await call("GET", "/instances/w1")).body as { id: string; volumes: unknown[] };
    expect(w1.volumes).toEqual([{ volume_id: "vol-w", mount_path: "/data", readonly: false }]);
    const volumeHost = (
      (await stack.db.execute(
        `select host_id from volumes where id = 'vol-w'`,
      )) as unknown as Array<{
        host_id: string;
      }>
    )[0]?.host_id;
    const [row] = await stack.db.select().from(instances).where(eq(instances.id, w1.id));
    expect(row?.hostId).toBe(volumeHost);
  });

  it("refuses to delete an attached volume; deleted, its file is gone from its host", async () => {
    await call("POST", "/volumes", { id: "vol-d", name: "d", size_gb: 1 });
    await create("d1", [{ volume_id: "vol-d", mount_path: "/d", readonly: true }]);
    const busy = await call("DELETE", "/volumes/vol-d");
    expect(busy).toMatchObject({ status: 409, body: { code: "conflict" } });
    const files = () =>
      stack.agents.flatMap((a) => {
        const dir = agentPaths(a.dataDir).volumesDir;
        return existsSync(dir) ? readdirSync(dir) : [];
      });
    const before = files().length;
    expect((await call("DELETE", "/instances/d1")).status).toBe(204);
    expect((await call("DELETE", "/volumes/vol-d")).status).toBe(204);
    expect((await call("GET", "/volumes/vol-d")).status).toBe(404);

    await waitFor(() => files().length === before - 1, { what: "the volume's file to go" });
  });

  describe("from an archive", () => {
    const upload = (query: string, body: Uint8Array) =>
      fetch(`${stack.cp.url}/volumes/from-archive?${query}`, {
        method: "POST",
        headers: { authorization: `Bearer ${stack.apiKey}`, "content-type": "application/gzip" },
        body,
      }).then(async (r) => ({
        status: r.status,
        body: (await r.json()) as Record<string, unknown>,
      }));
    const chunksLeft = async () =>
      Number(
        (
          (await stack.db.execute(
            sql`select count(*)::int as n from volume_archive_chunks`,
          )) as unknown as Array<{ n: number }>
        )[0]?.n,
      );
    /** The volume's file on whichever host holds it, read with debugfs. */
    const volumeFile = async (id: string) => {
      const [v] = await stack.db.select().from(volumes).where(eq(volumes.id, id));
      const i = stack.hostIds.indexOf(v?.hostId ?? "");
      return path.join(agentPaths(stack.agents[i]?.dataDir ?? "").volumesDir, `${v?.key}.ext4`);
    };

    it("unpacks a tar.gz into a new volume, confined to it", async () => {
      const archive = gzipSync(
        tar([
          dir("app"),
          file("app/hello", "hi from the archive\n"),
          file("../../escape", "kept inside"),
        ]),
      );
      const r = await upload("name=seeded&size_gb=1&id=vol-seeded&tags[src]=archive", archive);
      expect(r).toMatchObject({
        status: 201,
        body: { id: "vol-seeded", size_gb: 1, tags: { src: "archive" } },
      });
      const fs = readRootfs(await volumeFile("vol-seeded"));
      expect(await fs.cat("/app/hello")).toBe("hi from the archive");
      expect(await fs.cat("/escape")).toBe("kept inside");
      expect(await chunksLeft()).toBe(0);
    });

    it("refuses what is not gzip, too large, or does not fit, keeping nothing", async () => {
      const before = ((await call("GET", "/volumes")).body as unknown[]).length;
      const notGzip = await upload("name=x&size_gb=1", Buffer.from("plain text, not an archive"));
      expect(notGzip).toMatchObject({ status: 400, body: { code: "invalid_request" } });
      expect(notGzip.body.message).toMatch(/not gzip/);
      // Incompressible bytes past the limit (the body is refused as it streams).
      const big = gzipSync(tar([file("noise", randomBytes(ARCHIVE_LIMIT + 1024))]), { level: 0 });
      const tooBig = await upload("name=x&size_gb=1", big);
      expect(tooBig).toMatchObject({ status: 400 });
      expect(tooBig.body.message).toMatch(new RegExp(`over the ${ARCHIVE_LIMIT}-byte limit`));
      // Fits the limit compressed, not the volume unpacked: 1.1 GiB of zeros for 1 GiB.
      const zeros = await zeroArchive(1100);
      expect(zeros.length).toBeLessThan(ARCHIVE_LIMIT);
      const noFit = await upload("name=x&size_gb=1&id=vol-nofit", zeros);
      expect(noFit.status).toBe(400);
      expect(noFit.body.message).toMatch(/do not fit in a volume/);
      expect(((await call("GET", "/volumes")).body as unknown[]).length).toBe(before);
      expect(await chunksLeft()).toBe(0);
    });
  });
});

/** A tar.gz of one file of `mib` MiB of zeros, compressed as it is made (never whole). */
async function zeroArchive(mib: number): Promise<Buffer> {
  const size = mib * 1024 * 1024;
  const header = tarHeader(file("zeros", ""), size);
  const gz = createGzip({ level: 9 });
  const out: Buffer[] = [];
  gz.on("data", (d: Buffer) => out.push(d));
  const done = new Promise((r) => gz.on("end", r));
  gz.write(header);
  const zero = Buffer.alloc(1024 * 1024);
  for (let i = 0; i < mib; i++) {
    if (!gz.write(zero)) await new Promise((r) => gz.once("drain", r));
  }
  gz.end(Buffer.alloc(1024));
  await done;
  return Buffer.concat(out);
}
