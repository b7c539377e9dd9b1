// Pulls from a real registry (Debian's docker-registry on loopback, token auth): what a pulled
// image's rootfs holds, what its config carries, which bytes are fetched, and every way a pull
// must fail cleanly — with nothing left marked as pulled.
import { createHash, randomBytes } from "node:crypto";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  truncateSync,
  writeFileSync,
} from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  busyboxEntries,
  dir,
  file,
  hardlink,
  type LayerSpec,
  symlink,
  writeLayout,
} from "../../../scripts/oci-layout.ts";
import { push, startRegistry, type TestRegistry } from "../../testing/registry.ts";
import { readRootfs } from "../../testing/rootfs.ts";
import { ImageStore, type PullProgress } from "./store.ts";

const work = mkdtempSync(path.join(os.tmpdir(), "pull-test-"));
let reg: TestRegistry;
let n = 0;

beforeAll(async () => {
  reg = await startRegistry({ private: ["secret/app"] });
}, 60_000);
afterAll(async () => {
  await reg?.stop();
  rmSync(work, { recursive: true, force: true });
});

/** Pushes an image made of `layers` as `repo:tag` on `registry`; returns its layout's digests. */
async function pushed(
  repoTag: string,
  image: Parameters<typeof writeLayout>[1],
  registry: TestRegistry = reg,
) {
  const layout = path.join(work, `layout-${n++}`);
  const written = writeLayout(layout, image);
  await push(layout, `${registry.host}/${repoTag}`, registry.user);
  return written;
}

const freshStore = () => new ImageStore(mkdtempSync(path.join(work, "store-")));

/** What a store holds on disk besides what a successful pull adds: nothing half-made. */
function leftovers(store: ImageStore): string[] {
  const found: string[] = [];
  for (const sub of ["digests", "rootfs", "blobs/sha256"]) {
    const d = path.join(store.dir, sub);
    if (existsSync(d)) for (const f of readdirSync(d)) found.push(`${sub}/${f}`);
  }
  return found;
}

const base: LayerSpec = { entries: busyboxEntries() };

describe("pulling from a registry", () => {
  it("applies gzip, zstd and plain layers with whiteouts and an opaque dir, and carries the config", async () => {
    const image = await pushed("public/app:v1", {
      layers: [
        base,
        {
          compression: "zstd",
          entries: [
            dir("etc"),
            file("etc/motd", "lower motd\n"),
            dir("srv/data"),
            file("srv/data/old", "old\n"),
            dir("app"),
            file("app/run.sh", "#!/bin/sh\necho hello\n", 0o755),
          ],
        },
        {
          compression: "tar",
          entries: [
            file("etc/.wh.motd", ""),
            file("srv/data/.wh..wh..opq", ""),
            file("srv/data/new", "new\n"),
          ],
        },
      ],
      config: {
        Entrypoint: ["/app/run.sh"],
        Cmd: ["--flag"],
        Env: ["PATH=/usr/bin:/bin", "GREETING=hello=world"],
        WorkingDir: "/app",
        User: "app",
      },
    });
    const store = freshStore();
    const seen: PullProgress[] = [];
    const got = await store.pull(`${reg.host}/public/app:v1`, { onProgress: (p) => seen.push(p) });
    expect(got.digest).toBe(image.digest);
    expect(got).toMatchObject({
      platform: "linux/amd64",
      entrypoint: ["/app/run.sh"],
      cmd: ["--flag"],
      env: { PATH: "/usr/bin:/bin", GREETING: "hello=world" },
      working_dir: "/app",
      user: "app",
    });
    const fs = readRootfs(got.rootfs);
    expect(await fs.ls("/etc")).toEqual(["group", "passwd"]);
    expect(await fs.ls("/srv/data")).toEqual(["new"]);
    expect(await fs.cat("/app/run.sh")).toContain("echo hello");
    // Progress: bytes of every layer, ending complete, then the conversion.
    const total = image.layers.reduce((s, l) => s + l.size, 0);
    const pulling = seen.filter((p) => p.phase === "pulling");
    expect(pulling.at(-1)).toEqual({ phase: "pulling", bytes_done: total, bytes_total: total });
    expect(seen.at(-1)?.phase).toBe("converting");
    expect(await store.pulledDigests()).toEqual([image.digest]);
  });

  it("fetches only the layers it does not hold: a second image sharing the base pays for its own", async () => {
    const store = freshStore();
    await pushed("shared/one:v1", { layers: [base, { entries: [file("one", "1\n")] }] });
    const two = await pushed("shared/two:v1", {
      layers: [base, { entries: [file("two", "2".repeat(5000))] }],
    });
    await store.pull(`${reg.host}/shared/one:v1`);
    const before = reg.blobBytesServed();
    const got = await store.pull(`${reg.host}/shared/two:v1`);
    const served = reg.blobBytesServed() - before;
    const own = two.layers[1]?.size ?? 0;
    const baseSize = two.layers[0]?.size ?? 0;
    // The new layer and the config (a small blob); never the ~1 MB base again.
    expect(served).toBeGreaterThanOrEqual(own);
    expect(served).toBeLessThan(own + 4096);
    expect(baseSize).toBeGreaterThan(500_000);
    expect(await readRootfs(got.rootfs).cat("/two")).toHaveLength(5000);
  });

  it("keeps the cache within its bound: least recently used first, never an image in use", async () => {
    const store = freshStore();
    const a = await pushed("cache/a:v1", { layers: [base, { entries: [file("a", "a")] }] });
    const b = await pushed("cache/b:v1", { layers: [base, { entries: [file("b", "b")] }] });
    const pa = await store.pull(`${reg.host}/cache/a:v1`);
    const pb = await store.pull(`${reg.host}/cache/b:v1`);
    // Everything fits: nothing goes.
    expect(await store.evict(1024 ** 4, new Set())).toEqual([]);
    // A is in use, B is not: B goes, with its own layer; the shared base stays for A.
    expect(await store.evict(0, new Set([pa.rootfs]))).toEqual([b.digest]);
    expect(await store.pulledDigests()).toEqual([a.digest]);
    const blobs = readdirSync(path.join(store.dir, "blobs", "sha256"));
    expect(blobs.sort()).toEqual(a.layers.map((l) => l.digest.slice(7)).sort());
    expect(existsSync(pb.rootfs)).toBe(false);
    // Kept while asked to keep it; gone, layers and all, once nothing holds it.
    expect(await store.evict(0, new Set(), a.digest)).toEqual([]);
    expect(await store.evict(0, new Set())).toEqual([a.digest]);
    expect(leftovers(store)).toEqual([]);
  });

  it("uses credentials for a private repository, and says when they are missing or wrong", async () => {
    await pushed("secret/app:v1", { layers: [base], config: { Cmd: ["/bin/sh"] } });
    const ref = `${reg.host}/secret/app:v1`;
    const store = freshStore();
    await expect(store.pull(ref)).rejects.toThrow(/requires credentials for secret\/app \(401\)/);
    await expect(
      store.pull(ref, { credentials: { username: reg.user.username, password: "wrong" } }),
    ).rejects.toThrow(/refused the credentials for secret\/app/);
    expect(leftovers(store)).toEqual([]);
    const got = await store.pull(ref, { credentials: reg.user });
    expect(got.cmd).toEqual(["/bin/sh"]);
  });

  it("answers a registry's Basic challenge with the credentials given", async () => {
    const basic = await startRegistry({ auth: "basic" });
    try {
      await pushed("team/app:v1", { layers: [base], config: { Cmd: ["/bin/sh"] } }, basic);
      const ref = `${basic.host}/team/app:v1`;
      const store = freshStore();
      await expect(store.pull(ref)).rejects.toThrow(/requires credentials for team\/app \(401\)/);
      await expect(
        store.pull(ref, { credentials: { username: basic.user.username, password: "wrong" } }),
      ).rejects.toThrow(/refused the credentials for team\/app \(401\)/);
      expect(leftovers(store)).toEqual([]);
      expect((await store.pull(ref, { credentials: basic.user })).cmd).toEqual(["/bin/sh"]);
    } finally {
      await basic.stop();
    }
  });

  it("names an unknown tag or repository as the registry's 404", async () => {
    const store = freshStore();
    await expect(store.pull(`${reg.host}/public/app:no-such-tag`)).rejects.toThrow(
      /public\/app:no-such-tag not found in the registry \(404: MANIFEST_UNKNOWN/,
    );
    await expect(store.pull(`${reg.host}/nobody/here:v1`)).rejects.toThrow(
      /nobody\/here:v1 not found in the registry \(404/,
    );
    expect(leftovers(store)).toEqual([]);
  });

  it("follows an image index to the requested platform", async () => {
    // One layout holding two images, amd64 and arm64, and an index listing both.
    const layout = path.join(work, `layout-${n++}`);
    const amd = writeLayout(layout, { layers: [{ entries: [file("arch", "amd64")] }] });
    const indexAmd = JSON.parse(readFileSync(path.join(layout, "index.json"), "utf8"));
    const arm = writeLayout(layout, {
      layers: [{ entries: [file("arch", "arm64")] }],
      architecture: "arm64",
    });
    const indexArm = JSON.parse(readFileSync(path.join(layout, "index.json"), "utf8"));
    // The layout's one entry is an image index (a blob) naming both platforms' manifests.
    const nested = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.index.v1+json",
        manifests: [...indexAmd.manifests, ...indexArm.manifests],
      }),
    );
    const hex = createHash("sha256").update(nested).digest("hex");
    writeFileSync(path.join(layout, "blobs", "sha256", hex), nested);
    writeFileSync(
      path.join(layout, "index.json"),
      JSON.stringify({
        schemaVersion: 2,
        manifests: [
          {
            mediaType: "application/vnd.oci.image.index.v1+json",
            digest: `sha256:${hex}`,
            size: nested.length,
          },
        ],
      }),
    );
    await push(layout, `${reg.host}/public/multi:v1`, reg.user, "all");
    const ref = `${reg.host}/public/multi:v1`;
    const a = await freshStore().pull(ref);
    expect(a).toMatchObject({ digest: amd.digest, platform: "linux/amd64" });
    expect(await readRootfs(a.rootfs).cat("/arch")).toBe("amd64");
    const b = await freshStore().pull(ref, { platform: "linux/arm64" });
    expect(b).toMatchObject({ digest: arm.digest, platform: "linux/arm64" });
    await expect(freshStore().pull(ref, { platform: "linux/s390x" })).rejects.toThrow(
      "no linux/s390x manifest in the image index (it has linux/amd64, linux/arm64)",
    );
  });

  it("pulls Docker schema 2 manifests as well as OCI ones", async () => {
    const layout = path.join(work, `layout-${n++}`);
    writeLayout(layout, { layers: [base], config: { Cmd: ["/bin/sh"], Env: ["K=v"] } });
    await push(layout, `${reg.host}/public/docker:v1`, reg.user, "v2s2");
    const got = await freshStore().pull(`${reg.host}/public/docker:v1`);
    expect(got).toMatchObject({ cmd: ["/bin/sh"], env: { K: "v" }, platform: "linux/amd64" });
    expect(await readRootfs(got.rootfs).ls("/bin")).toContain("busybox");
  });

  it("refuses another platform than the image's", async () => {
    await pushed("public/plat:v1", { layers: [base], config: { Cmd: ["/bin/sh"] } });
    await expect(
      freshStore().pull(`${reg.host}/public/plat:v1`, { platform: "linux/arm64" }),
    ).rejects.toThrow(/image is linux\/amd64, not the requested linux\/arm64/);
  });

  it("rejects a corrupt blob and a truncated one, keeping neither", async () => {
    const corrupt = await pushed("public/corrupt:v1", {
      layers: [{ entries: [file("data", "x".repeat(100_000))], compression: "tar" }],
    });
    const layer = corrupt.layers[0]?.digest ?? "";
    // Same length, one byte changed, on the registry's own disk (it serves files as they are).
    const blob = reg.blobFile(layer);
    const bytes = readFileSync(blob);
    bytes[600] = bytes[600] === 0x41 ? 0x42 : 0x41;
    writeFileSync(blob, bytes);
    const store = freshStore();
    await expect(store.pull(`${reg.host}/public/corrupt:v1`)).rejects.toThrow(
      new RegExp(`blob ${layer} does not match its digest`),
    );
    expect(leftovers(store)).toEqual([]);

    const short = await pushed("public/short:v1", {
      layers: [{ entries: [file("data", "y".repeat(100_000))], compression: "tar" }],
    });
    const shortLayer = short.layers[0];
    truncateSync(reg.blobFile(shortLayer?.digest ?? ""), 50_000);
    await expect(store.pull(`${reg.host}/public/short:v1`)).rejects.toThrow(
      /ended after 50000 of \d+ bytes|does not match its digest/,
    );
    expect(leftovers(store)).toEqual([]);
  });

  it("refuses a layer over the configured limit before fetching it", async () => {
    const big = await pushed("public/big:v1", {
      layers: [{ entries: [file("big", Buffer.alloc(300_000, 1))], compression: "tar" }],
    });
    const before = reg.blobBytesServed();
    const store = freshStore();
    await expect(
      store.pull(`${reg.host}/public/big:v1`, { maxLayerBytes: 200_000 }),
    ).rejects.toThrow(
      new RegExp(`layer ${big.layers[0]?.digest} is \\d+ bytes, over the 200000-byte layer limit`),
    );
    // Only the config was fetched.
    expect(reg.blobBytesServed() - before).toBeLessThan(4096);
    expect(leftovers(store)).toEqual([]);
  });
});

describe("layers that reach outside the image", () => {
  // A directory beside the store that a hostile layer aims at: it must stay empty.
  const target = path.join(work, "target");
  const inside = target.slice(1);
  // What becomes of each: names are kept inside the image (tar drops the leading "/" and
  // "../"); a link pointing out of the root is refused, and so is the layer.
  const cases: Array<[string, LayerSpec["entries"], string[] | RegExp]> = [
    ["../ names", [file(`../../../../../../..${target}/dotdot`, "pwned")], [`${inside}/dotdot`]],
    [
      "absolute paths",
      [file(`${inside}/relative`, "ok"), file(`${target}/abs`, "pwned")],
      [`${inside}/abs`, `${inside}/relative`],
    ],
    [
      "a symlink out of the root",
      [symlink("out", target), file("out/through-symlink", "pwned")],
      /did not unpack: tar: can't create symlink 'out'/,
    ],
    [
      "a hard link out of the root",
      [hardlink("hl", "/etc/hostname"), file("hl", "pwned")],
      /did not unpack: tar: can't create hardlink 'hl'/,
    ],
  ];
  for (const [what, entries, outcome] of cases) {
    it(`keeps ${what} from touching the host`, async () => {
      rmSync(target, { recursive: true, force: true });
      mkdirSync(target, { recursive: true });
      const hostname = readFileSync("/etc/hostname", "utf8");
      const tag = what.replace(/[^a-z]+/g, "-").replace(/^-|-$/g, "");
      await pushed(`escape/${tag}:v1`, { layers: [{ entries, compression: "tar" }] });
      const store = freshStore();
      const result = await store.pull(`${reg.host}/escape/${tag}:v1`).catch((e: Error) => e);
      expect(readdirSync(target)).toEqual([]);
      expect(readFileSync("/etc/hostname", "utf8")).toBe(hostname);
      if (outcome instanceof RegExp) {
        expect(result).toBeInstanceOf(Error);
        expect((result as Error).message).toMatch(outcome);
        // Nothing of the image kept but the verified layer itself.
        expect(leftovers(store).filter((f) => !f.startsWith("blobs/"))).toEqual([]);
      } else {
        if (result instanceof Error) throw result;
        const fs = readRootfs(result.rootfs);
        for (const f of outcome) expect(await fs.cat(f)).toMatch(/pwned|ok/);
        expect(await fs.ls(path.dirname(outcome[0] as string))).toEqual(
          outcome.map((f) => path.basename(f)).sort(),
        );
      }
    });
  }
});

describe("a registry that goes away mid-pull", () => {
  // 24 MiB of incompressible data: far more than socket buffers hold, so the pull is still
  // reading when the registry stops.
  const noise = () => ({
    compression: "tar" as const,
    entries: [file("noise", randomBytes(24 * 1024 * 1024))],
  });

  it("fails with a timeout when the registry stops answering", async () => {
    const hung = await startRegistry();
    try {
      await pushed("public/hang:v1", { layers: [noise()] }, hung);
      const store = freshStore();
      let stopped = false;
      const result = await store
        .pull(`${hung.host}/public/hang:v1`, {
          idleTimeoutMs: 1500,
          onProgress: (p) => {
            if (!stopped && p.bytes_done > 0) {
              stopped = true;
              hung.signal("SIGSTOP");
            }
          },
        })
        .catch((e: Error) => e);
      expect(stopped).toBe(true);
      expect(result).toBeInstanceOf(Error);
      expect((result as Error).message).toMatch(/registry stopped answering while sending sha256:/);
      expect(leftovers(store)).toEqual([]);
    } finally {
      await hung.stop();
    }
  });

  it("fails cleanly when the registry is killed", async () => {
    const dying = await startRegistry();
    try {
      await pushed("public/die:v1", { layers: [noise()] }, dying);
      const store = freshStore();
      let killed = false;
      const result = await store
        .pull(`${dying.host}/public/die:v1`, {
          onProgress: (p) => {
            if (!killed && p.bytes_done > 0) {
              killed = true;
              dying.signal("SIGKILL");
            }
          },
        })
        .catch((e: Error) => e);
      expect(killed).toBe(true);
      expect((result as Error).message).toMatch(
        /connection to the registry failed while reading sha256:|ended after \d+ of \d+ bytes/,
      );
      expect(leftovers(store)).toEqual([]);
    } finally {
      await dying.stop();
    }
  });
});
