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
// the manifest and stats a few files. Missing Debian packages are installed with apt-get (root).
//
// Guest contract of /init. With an image (the instance's case), three virtio disks found by
// their serial numbers:
//   offshoot-root   the image's rootfs (ext4, read-only): overlayfs lowerdir
//   offshoot-rw     the instance's disk (ext4): overlayfs upper and work dirs
//   offshoot-cfg    a shell fragment that sets OFFSHOOT_HOSTNAME, OFFSHOOT_WORKDIR, defines
//                   offshoot_env (exports the environment) and `set --` the program's argv
// /init mounts the overlay at /newroot and runs the program there (chroot, working dir, env);
// it stays PID 1 in the initramfs to report the exit. Without disks (launch tests), the kernel
// command line decides:
//   offshoot.cmd=BASE64   shell command to run (`sh -c`); without it, a counter loop prints
//                         `OFFSHOOT-COUNT n` every second.
//   MODULE.PARAM=VALUE    passed to that module's insmod: busybox insmod ignores module
//                         parameters on the kernel command line.
// Serial markers: `OFFSHOOT-INIT {"event":"ready"}` before the program starts,
// `OFFSHOOT-INIT {"event":"exit","code":N}` after it ends (with `"oom":true` when the kernel's
// OOM killer ended it), `OFFSHOOT-INIT {"event":"failed","message":"…"}` when the guest cannot
// start its program at all; then the guest powers off.
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
] as const;

/** Only q35/pc guests need these; a kernel without them still boots microvm guests. */
const OPTIONAL_MODULES: ReadonlySet<string> = new Set(["virtio_pci"]);

export const INIT_SCRIPT = `#!/bin/sh
# Offshoot guest init (built by scripts/vm-assets.ts).
export PATH=/bin:/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts
# The kernel may have found no /dev/console before devtmpfs was mounted.
exec </dev/console >/dev/console 2>&1
marker() { echo "OFFSHOOT-INIT $1"; }
cmdline=$(cat /proc/cmdline)
while read -r mod; do
  [ -n "$mod" ] || continue
  params=""
  for tok in $cmdline; do
    case "$tok" in "$mod".*=*) params="$params \${tok#"$mod".}" ;; esac
  done
  # shellcheck disable=SC2086
  insmod "/lib/modules/$mod.ko" $params || marker "{\\"event\\":\\"insmod_failed\\",\\"module\\":\\"$mod\\"}"
done </etc/offshoot/modules
cmd=""
for tok in $cmdline; do
  case "$tok" in offshoot.cmd=*) cmd=$(echo "\${tok#offshoot.cmd=}" | base64 -d) ;; esac
done
hostname offshoot
ip link set lo up 2>/dev/null
# The control channel: the virtio-serial port named offshoot.ctl, one command per line, one reply
# line each (host side: host-agent/src/drivers/qemu/control.ts). While the host is not connected
# a read returns EOF at once, hence the short sleep between reads.
ctl_port() {
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = offshoot.ctl ] && { echo "/dev/\${p##*/}"; return 0; }
  done
  return 1
}
ctl_mac() {
  # Shell builtins where possible: every fork costs a lot under TCG.
  read -r cur 2>/dev/null </sys/class/net/eth0/address || { echo "err mac no eth0"; return; }
  [ "$cur" = "$1" ] && { echo "ok mac $cur"; return; }
  read -r flags </sys/class/net/eth0/flags
  up=$((flags & 1))
  [ "$up" = 0 ] || ip link set eth0 down
  if out=$(ip link set eth0 address "$1" 2>&1); then
    read -r cur </sys/class/net/eth0/address
    echo "ok mac $cur"
  else
    echo "err mac" $out
  fi
  [ "$up" = 0 ] || ip link set eth0 up
}
ctl_identity() {
  hostname "$1" 2>/dev/null || { echo "err identity hostname $1"; return; }
  [ "$2" = - ] && { echo "ok identity $(hostname) -"; return; }
  r=$(ctl_mac "$2")
  case "$r" in
    "ok mac "*) echo "ok identity $(hostname) \${r#ok mac }" ;;
    *) echo "err identity $r" ;;
  esac
}
ctl_stop() {
  if read -r pid 2>/dev/null </run/offshoot/program.pid && kill -TERM "$pid" 2>/dev/null; then
    echo "ok stop"
  else
    echo "err stop no program to stop"
  fi
}
ctl_serve() {
  tries=0
  until dev=$(ctl_port); do
    tries=$((tries + 1))
    [ "$tries" -lt 100 ] || { echo "offshoot: no control port"; return 1; }
    sleep 0.1
  done
  exec 3<>"$dev" || return 1
  while :; do
    if read -r verb arg <&3; then
      case "$verb" in
        "") ;;
        ping) echo pong ;;
        mac) ctl_mac "$arg" ;;
        # shellcheck disable=SC2086
        identity) ctl_identity $arg ;;
        stop) ctl_stop ;;
        query)
          if [ "$arg" = mac ] && read -r cur 2>/dev/null </sys/class/net/eth0/address; then
            echo "ok mac $cur"
          else
            echo "err query $arg"
          fi
          ;;
        *) echo "err $verb unknown command" ;;
      esac >&3
    else
      sleep 0.1
    fi
  done
}
ctl_serve </dev/null &
fail() {
  marker "{\\"event\\":\\"failed\\",\\"message\\":\\"$1\\"}"
  sync
  poweroff -f
}
disk() {
  for b in /sys/block/vd*; do
    [ "$(cat "$b/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/\${b##*/}"; return 0; }
  done
  return 1
}
if root_dev=$(disk offshoot-root); then
  rw_dev=$(disk offshoot-rw) || fail "no instance disk"
  cfg_dev=$(disk offshoot-cfg) || fail "no config disk"
  mkdir -p /mnt/lower /mnt/rw /newroot /run/offshoot
  mount -t ext4 -o ro "$root_dev" /mnt/lower || fail "cannot mount the image rootfs"
  mount -t ext4 "$rw_dev" /mnt/rw || fail "cannot mount the instance disk"
  mkdir -p /mnt/rw/upper /mnt/rw/work
  mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /newroot ||
    fail "cannot mount the overlay"
  mount -t proc proc /newroot/proc
  mount -t sysfs sysfs /newroot/sys
  mount --bind /dev /newroot/dev
  mount -t tmpfs -o mode=755 tmpfs /newroot/run
  # This init's busybox, for the program's launch only (the image may have no shell).
  mount --bind -o ro /bin /newroot/.offshoot
  cat "$cfg_dev" >/run/offshoot/config.sh && . /run/offshoot/config.sh || fail "unreadable config disk"
  hostname "$OFFSHOOT_HOSTNAME"
  # argv[0] is looked up in the image's PATH here: busybox's own sh would run its applet of the
  # same name instead of the image's program.
  prog=$1
  shift
  case "$prog" in
    */*) ;;
    *)
      search=$(offshoot_env; echo "$PATH")
      found=""
      IFS=:
      for d in $search; do
        if [ -L "/newroot$d/$prog" ] || [ -x "/newroot$d/$prog" ]; then found="$d/$prog"; break; fi
      done
      unset IFS
      prog=\${found:-$prog}
      ;;
  esac
  if [ -z "\${prog##*/*}" ]; then
    (
      offshoot_env
      launch='mkdir -p "$1" 2>/dev/null; cd "$1" || exit 1; shift; exec "$@"'
      exec /bin/chroot /newroot /.offshoot/sh -c "$launch" sh "$OFFSHOOT_WORKDIR" "$prog" "$@"
    ) &
    # One pid from here to the program (every step execs): what a graceful stop signals. It
    # is recorded before the ready marker, so a stop right after Running finds it.
    echo $! >/run/offshoot/program.pid
    marker '{"event":"ready"}'
    wait $!
    code=$?
  else
    marker '{"event":"ready"}'
    echo "offshoot: $prog: command not found"
    code=127
  fi
  oom=""
  [ "$code" = 137 ] && dmesg 2>/dev/null | grep -q "Out of memory: Killed process" && oom=',"oom":true'
  sync
  umount /newroot/.offshoot /newroot/run /newroot/dev /newroot/sys /newroot/proc 2>/dev/null
  umount /newroot /mnt/rw 2>/dev/null
  marker "{\\"event\\":\\"exit\\",\\"code\\":$code$oom}"
  poweroff -f
fi
marker '{"event":"ready"}'
if [ -n "$cmd" ]; then
  sh -c "$cmd"
  code=$?
else
  n=0
  while :; do
    echo "OFFSHOOT-COUNT $n"
    n=$((n + 1))
    sleep 1
  done
fi
marker "{\\"event\\":\\"exit\\",\\"code\\":$code}"
sync
poweroff -f
`;

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

function buildInitramfs(dir: string, modulesDir: string, plan: ModulePlan, out: string): void {
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
  writeFileSync(path.join(stage, "init"), INIT_SCRIPT, { mode: 0o755 });
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

const RECIPE = createHash("sha256")
  .update(JSON.stringify({ v: 1, init: INIT_SCRIPT, modules: WANTED_MODULES }))
  .digest("hex")
  .slice(0, 16);

function fresh(m: Manifest | undefined): m is Manifest {
  return (
    m !== undefined &&
    m.recipe === RECIPE &&
    [m.qemu, m.kernelElf, m.bzImage, m.initramfs].every((f) => existsSync(f))
  );
}

/** Makes sure the packages, kernel and initramfs exist under `dir`; quick when they do. */
export async function ensureVmAssets(dir: string = defaultAssetsDir()): Promise<VmAssets> {
  const manifestFile = path.join(dir, "assets.json");
  const cached = readManifest(manifestFile);
  if (fresh(cached)) return pick(cached);
  mkdirSync(dir, { recursive: true });
  return withLock(dir, () => {
    const again = readManifest(manifestFile);
    if (fresh(again)) return pick(again);
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
    const initramfs = path.join(dir, `initramfs-${kernelVersion}-${RECIPE}.cpio.gz`);
    buildInitramfs(dir, modulesDir, plan, initramfs);
    const manifest: Manifest = {
      qemu: QEMU,
      kernelElf,
      bzImage,
      initramfs,
      kernelVersion,
      recipe: RECIPE,
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
