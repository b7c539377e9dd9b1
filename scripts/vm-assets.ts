// Over 400 lines: one build, read top to bottom (packages → kernel → modules → initramfs).
// Everything a QEMU guest needs on this host, built once into a cache directory (never into git):
// QEMU itself, Debian's cloud kernel (bzImage and the ELF vmlinux with its PVH entry, which
// `-machine microvm` boots directly) and a busybox initramfs whose /init loads the virtio
// modules, prints machine-readable markers on the serial console and runs the guest program.
//
//   import { ensureVmAssets } from "./scripts/vm-assets.ts";
//   const assets = await ensureVmAssets();   // { qemu, kernelElf, bzImage, initramfs, kernelVersion }
//
// As a CLI, `node --import tsx scripts/vm-assets.ts` prints that JSON. The cache defaults to
// `.data/vm-assets` at the repo root (OFFSHOOT_VM_ASSETS overrides it). A second call only reads
// the manifest, the init and ctl.c and stats a few files. Missing Debian packages are installed
// with apt-get (root).
//
// The /init packed is host-agent/guest/init, as it is, and beside it /bin/offshoot-ctl, compiled
// static from host-agent/guest/ctl.c: the control channel's answering side. What they print, read
// and answer is host-agent/guest/protocol.ts.
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import {
  chmodSync,
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

export interface VmAssets {
  /** qemu-system-x86_64 */
  qemu: string;
  /** The ELF vmlinux (PVH entry) for `-machine microvm -kernel`. */
  kernelElf: string;
  /** Debian's bzImage, for machines that boot it (q35/pc). */
  bzImage: string;
  /** gzip'd newc cpio: busybox, the virtio/overlay modules, /init. */
  initramfs: string;
  /** e.g. 6.1.0-50-cloud-amd64 */
  kernelVersion: string;
}

interface Manifest extends VmAssets {
  /** Hash of how the initramfs was made; a change to this file's recipe rebuilds it. */
  recipe: string;
  /** Modules in the initramfs, in load order (dependencies first). */
  modules: string[];
  /** Wanted modules the kernel has built in (nothing to load). */
  builtin: string[];
}

const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const QEMU = "/usr/bin/qemu-system-x86_64";
const BUSYBOX = "/bin/busybox";

/** Debian package → a file that proves it is installed. */
const PACKAGES: ReadonlyArray<readonly [pkg: string, file: string]> = [
  ["qemu-system-x86", QEMU],
  ["qemu-utils", "/usr/bin/qemu-img"],
  ["busybox-static", BUSYBOX],
  ["lz4", "/usr/bin/lz4"],
  ["cpio", "/usr/bin/cpio"],
  ["xfsprogs", "/usr/sbin/mkfs.xfs"],
  // offshoot-ctl is compiled static: the compiler and glibc's static archive.
  ["gcc", "/usr/bin/gcc"],
  ["libc6-dev", "/usr/lib/x86_64-linux-gnu/libc.a"],
  // Not for building: the agent's guest network (its nftables table; ip and tc are iproute2's).
  ["nftables", "/usr/sbin/nft"],
  // Nor these: pulled images' zstd layers, and erofs root filesystems (AGENT_ROOTFS_FORMAT).
  ["zstd", "/usr/bin/zstd"],
  ["erofs-utils", "/usr/bin/mkfs.erofs"],
];

/** What the guest loads; virtio_pci is for q35/pc guests, the rest for microvm too. */
const WANTED_MODULES = [
  "virtio_mmio",
  "virtio_pci",
  "virtio_blk",
  "virtio_net",
  "virtio_console",
  "overlay",
  "ext4",
  "erofs",
] as const;

/** Only q35/pc guests need these; a kernel without them still boots microvm guests. */
const OPTIONAL_MODULES: ReadonlySet<string> = new Set(["virtio_pci", "erofs"]);

/** The guest's /init, packed as it is (protocol.ts beside it says what it prints and reads). */
export const INIT_FILE = path.join(REPO_ROOT, "host-agent", "guest", "init");
/** The control channel's guest side, compiled into the initramfs as CTL_BINARY. */
export const CTL_SOURCE = path.join(REPO_ROOT, "host-agent", "guest", "ctl.c");
export const CTL_BINARY = "bin/offshoot-ctl";
/** The guest agent (exec, stat), compiled into the initramfs as AGENT_BINARY. */
export const AGENT_SOURCE = path.join(REPO_ROOT, "host-agent", "guest", "agent.c");
export const AGENT_BINARY = "bin/offshoot-agent";
/** How CTL_SOURCE is compiled: static (the initramfs has no libc), small, warnings fatal. */
const CTL_CFLAGS = ["-static", "-Os", "-Wall", "-Wextra", "-Werror"] as const;

const log = (msg: string) => process.stderr.write(`[vm-assets] ${msg}\n`);

export function defaultAssetsDir(): string {
  return process.env.OFFSHOOT_VM_ASSETS ?? path.join(REPO_ROOT, ".data", "vm-assets");
}

function run(cmd: string, args: string[], opts: { cwd?: string } = {}): string {
  const r = spawnSync(cmd, args, {
    cwd: opts.cwd,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" },
    maxBuffer: 64 * 1024 * 1024,
  });
  if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} exited with ${r.status ?? r.signal}: ${r.stderr}`);
  }
  return r.stdout;
}

/** True when the ELF file has no PT_INTERP header, i.e. it runs without a dynamic loader. */
function isStaticElf(file: string): boolean {
  const fd = openSync(file, "r");
  try {
    const hdr = Buffer.alloc(64);
    readSync(fd, hdr, 0, 64, 0);
    if (hdr.readUInt32BE(0) !== 0x7f454c46 || hdr[4] !== 2) return false;
    const phoff = Number(hdr.readBigUInt64LE(32));
    const phentsize = hdr.readUInt16LE(54);
    const phnum = hdr.readUInt16LE(56);
    const ph = Buffer.alloc(phentsize * phnum);
    readSync(fd, ph, 0, ph.length, phoff);
    for (let i = 0; i < phnum; i++) if (ph.readUInt32LE(i * phentsize) === 3) return false;
    return true;
  } finally {
    closeSync(fd);
  }
}

function ensurePackages(): void {
  const missing = PACKAGES.filter(([pkg, file]) =>
    pkg === "busybox-static" ? !existsSync(file) || !isStaticElf(file) : !existsSync(file),
  ).map(([pkg]) => pkg);
  if (missing.length === 0) return;
  log(`installing ${missing.join(" ")}`);
  run("apt-get", ["update", "-q"]);
  run("apt-get", ["install", "-y", "-q", "--no-install-recommends", ...missing]);
}

/** The current cloud kernel package, e.g. linux-image-6.1.0-50-cloud-amd64. */
function cloudKernelPackage(): string {
  const find = () => {
    const out = run("apt-cache", ["depends", "linux-image-cloud-amd64"]);
    return /Depends:\s*(linux-image-\S+-cloud-amd64)\b/.exec(out)?.[1];
  };
  let pkg: string | undefined;
  try {
    pkg = find();
  } catch {
    // No package lists yet on a fresh machine.
  }
  if (!pkg) {
    run("apt-get", ["update", "-q"]);
    pkg = find();
  }
  if (!pkg) throw new Error("apt-cache knows no linux-image-*-cloud-amd64 package");
  return pkg;
}

/** Downloads and unpacks the kernel package (not installed); returns the unpacked tree. */
function ensureKernelTree(dir: string, pkg: string): string {
  const tree = path.join(dir, "kernel", pkg);
  if (existsSync(path.join(tree, ".done"))) return tree;
  const debDir = path.join(dir, "debs");
  mkdirSync(debDir, { recursive: true });
  let deb = readdirSync(debDir).find((f) => f.startsWith(`${pkg}_`) && f.endsWith(".deb"));
  if (!deb) {
    log(`downloading ${pkg}`);
    try {
      run("apt-get", ["download", "-q", pkg], { cwd: debDir });
    } catch (e) {
      // Stale package lists point at a .deb the mirror no longer has.
      log(`download failed (${(e as Error).message.split("\n")[0]}); apt-get update and retry`);
      run("apt-get", ["update", "-q"]);
      run("apt-get", ["download", "-q", pkg], { cwd: debDir });
    }
    deb = readdirSync(debDir).find((f) => f.startsWith(`${pkg}_`) && f.endsWith(".deb"));
    if (!deb) throw new Error(`apt-get download ${pkg} left no .deb in ${debDir}`);
  }
  rmSync(tree, { recursive: true, force: true });
  mkdirSync(tree, { recursive: true });
  run("dpkg-deb", ["-x", path.join(debDir, deb), tree]);
  writeFileSync(path.join(tree, ".done"), "");
  return tree;
}

/** The bzImage's payload is one LZ4 (legacy format) stream; lz4 warns about what follows it. */
function extractVmlinux(bzImage: string, out: string): void {
  const image = readFileSync(bzImage);
  const at = image.indexOf(Buffer.from([0x02, 0x21, 0x4c, 0x18]));
  if (at < 0) throw new Error(`${bzImage}: no LZ4 stream (magic 02 21 4c 18) found`);
  const lz = `${out}.lz4.tmp`;
  const tmp = `${out}.tmp`;
  writeFileSync(lz, image.subarray(at));
  // lz4 exits 1 ("Stream followed by undecodable data": the rest of the bzImage) after writing
  // the whole ELF, so the output is checked instead of the exit status.
  spawnSync("lz4", ["-d", "-f", "-q", lz, tmp], { stdio: "ignore" });
  rmSync(lz, { force: true });
  if (!existsSync(tmp)) throw new Error(`lz4 produced nothing from ${bzImage}`);
  const head = Buffer.alloc(4);
  const fd = openSync(tmp, "r");
  readSync(fd, head, 0, 4, 0);
  closeSync(fd);
  if (head.readUInt32BE(0) !== 0x7f454c46) throw new Error(`${tmp} is not an ELF file`);
  renameSync(tmp, out);
}

interface ModulePlan {
  /** [name, path relative to the modules dir], dependencies first. */
  load: Array<[string, string]>;
  builtin: string[];
}

const modName = (file: string) =>
  path
    .basename(file)
    .replace(/\.ko(\.\w+)?$/, "")
    .replace(/-/g, "_");

function moduleBytes(file: string): Buffer {
  if (file.endsWith(".ko")) return readFileSync(file);
  if (file.endsWith(".ko.xz")) return execFileSync("xz", ["-dc", file], { maxBuffer: 1 << 28 });
  if (file.endsWith(".ko.zst")) return execFileSync("zstd", ["-dcq", file], { maxBuffer: 1 << 28 });
  if (file.endsWith(".ko.gz")) return execFileSync("gzip", ["-dc", file], { maxBuffer: 1 << 28 });
  throw new Error(`unknown module format: ${file}`);
}

/** A module's `depends=` from its .modinfo strings. The package ships no modules.dep (depmod
 * writes it at install time) and kmod may not be installed, so this reads the source of truth. */
function moduleDeps(bytes: Buffer): string[] {
  const at = bytes.indexOf("\0depends=");
  if (at < 0) return [];
  const end = bytes.indexOf(0, at + 1);
  return bytes
    .subarray(at + "\0depends=".length, end)
    .toString("utf8")
    .split(",")
    .filter(Boolean)
    .map(modName);
}

function planModules(modulesDir: string): ModulePlan {
  const lines = (file: string) =>
    existsSync(path.join(modulesDir, file))
      ? readFileSync(path.join(modulesDir, file), "utf8").split("\n").filter(Boolean)
      : [];
  const files = new Map<string, string>();
  for (const rel of lines("modules.order")) files.set(modName(rel), rel);
  const builtinSet = new Set(lines("modules.builtin").map(modName));
  const load: Array<[string, string]> = [];
  const seen = new Set<string>();
  const visit = (name: string) => {
    if (seen.has(name) || builtinSet.has(name)) return;
    seen.add(name);
    const listed = files.get(name);
    // modules.order names .ko; a kernel package may ship them compressed.
    const rel = ["", ".xz", ".zst", ".gz"]
      .map((ext) => `${listed}${ext}`)
      .find((f) => listed && existsSync(path.join(modulesDir, f)));
    if (!rel) throw new Error(`module ${name} is neither in modules.order nor built in`);
    for (const d of moduleDeps(moduleBytes(path.join(modulesDir, rel)))) visit(d);
    load.push([name, rel]);
  };
  const builtin: string[] = [];
  for (const name of WANTED_MODULES) {
    if (builtinSet.has(name)) builtin.push(name);
    else if (files.has(name) || !OPTIONAL_MODULES.has(name)) visit(name);
  }
  return { load, builtin };
}

function buildInitramfs(
  dir: string,
  modulesDir: string,
  plan: ModulePlan,
  init: string,
  sources: GuestSources,
  out: string,
): void {
  const stage = path.join(dir, "initramfs.stage");
  rmSync(stage, { recursive: true, force: true });
  for (const d of [
    "bin",
    "dev",
    "etc/offshoot",
    "lib/modules",
    "proc",
    "sys",
    "tmp",
    "run",
    "root",
  ])
    mkdirSync(path.join(stage, d), { recursive: true });
  symlinkSync("bin", path.join(stage, "sbin"));
  writeFileSync(path.join(stage, "bin", "busybox"), readFileSync(BUSYBOX));
  chmodSync(path.join(stage, "bin", "busybox"), 0o755);
  const applets = run(BUSYBOX, ["--list"]).split("\n").filter(Boolean);
  for (const a of applets) if (a !== "busybox") symlinkSync("busybox", path.join(stage, "bin", a));
  // busybox insmod does not decompress: modules go in as plain .ko.
  for (const [name, rel] of plan.load)
    writeFileSync(
      path.join(stage, "lib", "modules", `${name}.ko`),
      moduleBytes(path.join(modulesDir, rel)),
    );
  writeFileSync(
    path.join(stage, "etc", "offshoot", "modules"),
    plan.load.map(([n]) => `${n}\n`).join(""),
  );
  writeFileSync(path.join(stage, "init"), init, { mode: 0o755 });
  compileGuest(sources.ctl, path.join(stage, CTL_BINARY));
  compileGuest(sources.agent, path.join(stage, AGENT_BINARY));
  // A console node lets the kernel give /init its stdio; mknod needs root, devtmpfs covers the rest.
  spawnSync("mknod", ["-m", "600", path.join(stage, "dev", "console"), "c", "5", "1"]);
  const tmp = `${out}.tmp`;
  const r = spawnSync(
    "sh",
    [
      "-c",
      'cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6 > "$2"',
      "sh",
      stage,
      tmp,
    ],
    { stdio: ["ignore", "ignore", "pipe"], encoding: "utf8" },
  );
  if (r.status !== 0) throw new Error(`building the initramfs failed: ${r.stderr}`);
  renameSync(tmp, out);
  rmSync(stage, { recursive: true, force: true });
}

/** The C sources compiled into the initramfs: ctl.c and agent.c, as text. */
export interface GuestSources {
  ctl: string;
  agent: string;
}

/** Compiles one of the guest's C programs (its source text) into `out`, stripped. */
function compileGuest(source: string, out: string): void {
  const src = `${out}.c`;
  writeFileSync(src, source);
  try {
    run("gcc", [...CTL_CFLAGS, "-s", "-o", out, src]);
  } finally {
    rmSync(src, { force: true });
  }
  if (!isStaticElf(out)) throw new Error(`${out} is not a static executable`);
}

function readManifest(file: string): Manifest | undefined {
  try {
    return JSON.parse(readFileSync(file, "utf8")) as Manifest;
  } catch {
    return undefined;
  }
}

/** A directory lock (mkdir is atomic) so parallel test files build the cache once. */
async function withLock<T>(dir: string, fn: () => T): Promise<T> {
  const lock = path.join(dir, ".lock");
  const deadline = Date.now() + 15 * 60_000;
  for (;;) {
    try {
      mkdirSync(lock);
      writeFileSync(path.join(lock, "pid"), String(process.pid));
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
      let holder = Number.NaN;
      try {
        holder = Number(readFileSync(path.join(lock, "pid"), "utf8"));
      } catch {
        // Just created; the pid file is not written yet.
      }
      if (Number.isInteger(holder) && !pidAlive(holder)) {
        rmSync(lock, { recursive: true, force: true });
        continue;
      }
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${lock}`);
      await new Promise((r) => setTimeout(r, 250));
    }
  }
  try {
    return fn();
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Names the initramfs made from this init text and the C sources: an edit of any, of how
 * the source is compiled or of the modules wanted builds a new one (and the manifest records the
 * recipe it was built from). */
export function initramfsRecipe(init: string, sources: GuestSources): string {
  return createHash("sha256")
    .update(JSON.stringify({ v: 3, init, ...sources, cflags: CTL_CFLAGS, modules: WANTED_MODULES }))
    .digest("hex")
    .slice(0, 16);
}

function fresh(m: Manifest | undefined, recipe: string): m is Manifest {
  return (
    m !== undefined &&
    m.recipe === recipe &&
    [m.qemu, m.kernelElf, m.bzImage, m.initramfs].every((f) => existsSync(f))
  );
}

/** Makes sure the packages, kernel and initramfs exist under `dir`; quick when they do. */
export async function ensureVmAssets(dir: string = defaultAssetsDir()): Promise<VmAssets> {
  const manifestFile = path.join(dir, "assets.json");
  const init = readFileSync(INIT_FILE, "utf8");
  const sources: GuestSources = {
    ctl: readFileSync(CTL_SOURCE, "utf8"),
    agent: readFileSync(AGENT_SOURCE, "utf8"),
  };
  const recipe = initramfsRecipe(init, sources);
  const cached = readManifest(manifestFile);
  // A package removed since the cache was built (or one added to the list) is installed again.
  if (PACKAGES.some(([, file]) => !existsSync(file))) {
    mkdirSync(dir, { recursive: true });
    await withLock(dir, ensurePackages);
  }
  if (fresh(cached, recipe)) return pick(cached);
  mkdirSync(dir, { recursive: true });
  return withLock(dir, () => {
    const again = readManifest(manifestFile);
    if (fresh(again, recipe)) return pick(again);
    ensurePackages();
    const pkg = cloudKernelPackage();
    const kernelVersion = pkg.replace(/^linux-image-/, "");
    const tree = ensureKernelTree(dir, pkg);
    const srcBz = path.join(tree, "boot", `vmlinuz-${kernelVersion}`);
    if (!existsSync(srcBz)) throw new Error(`${pkg} has no boot/vmlinuz-${kernelVersion}`);
    const bzImage = path.join(dir, `bzImage-${kernelVersion}`);
    if (!existsSync(bzImage)) writeFileSync(bzImage, readFileSync(srcBz));
    const kernelElf = path.join(dir, `vmlinux-${kernelVersion}`);
    if (!existsSync(kernelElf)) extractVmlinux(bzImage, kernelElf);
    const modulesDir = path.join(tree, "lib", "modules", kernelVersion);
    const plan = planModules(modulesDir);
    const initramfs = path.join(dir, `initramfs-${kernelVersion}-${recipe}.cpio.gz`);
    buildInitramfs(dir, modulesDir, plan, init, sources, initramfs);
    const manifest: Manifest = {
      qemu: QEMU,
      kernelElf,
      bzImage,
      initramfs,
      kernelVersion,
      recipe,
      modules: plan.load.map(([n]) => n),
      builtin: plan.builtin,
    };
    writeFileSync(`${manifestFile}.tmp`, `${JSON.stringify(manifest, null, 2)}\n`);
    renameSync(`${manifestFile}.tmp`, manifestFile);
    log(`ready: ${kernelVersion}, modules ${manifest.modules.join(" ")}`);
    return pick(manifest);
  });
}

/** Modules packed into the initramfs and built-ins, as recorded in the cache's manifest. */
export function vmAssetsModules(
  dir: string = defaultAssetsDir(),
): { modules: string[]; builtin: string[] } | undefined {
  const m = readManifest(path.join(dir, "assets.json"));
  return m ? { modules: m.modules, builtin: m.builtin } : undefined;
}

function pick(m: Manifest): VmAssets {
  return {
    qemu: m.qemu,
    kernelElf: m.kernelElf,
    bzImage: m.bzImage,
    initramfs: m.initramfs,
    kernelVersion: m.kernelVersion,
  };
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  ensureVmAssets().then(
    (a) => process.stdout.write(`${JSON.stringify(a, null, 2)}\n`),
    (e: unknown) => {
      log(String(e instanceof Error ? e.message : e));
      process.exit(1);
    },
  );
}
