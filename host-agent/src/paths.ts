// Every path the agent writes, built in one place (as Hypeman's lib/paths does), so the on-disk
// layout can be read off this file and no caller joins user input onto a path by itself.
import { createHash } from "node:crypto";
import path from "node:path";
import { InvalidRequestError } from "@offshoot/shared";

// CUID2 ids are lowercase alphanumerics; anything with a dot or slash could escape the data dir.
const SAFE_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;

export interface AgentPaths {
  readonly root: string;
  /** Append-only JSON lines: command ids, steps and outcomes. */
  readonly journal: string;
  /** Holds the pid of the agent that owns this data dir. */
  readonly pidFile: string;
  /** The agent's own record of the operations it ran on an instance (log source "hypeman"). */
  operationsLog(id: string): string;
  readonly operationsLogDir: string;
  /** The image cache (images/store.ts): refs and one read-only rootfs per digest. */
  readonly imagesDir: string;
  /** Volumes (volumes.ts): one ext4 file each. */
  readonly volumesDir: string;
  /** Snapshots: the same layout as instances, each snapshot a record with its files. */
  readonly simSnapshots: AgentPaths["sim"];
  readonly qemuSnapshots: AgentPaths["qemu"];
  /** While a snapshot is restored into an instance: its new files, made beside the old. */
  readonly qemuRestoring: AgentPaths["qemu"];
  /** While a snapshot is restored into an instance: its old files, until the new are in place. */
  readonly qemuReplaced: AgentPaths["qemu"];
  readonly sim: {
    /** One line per op the sim executed (not replayed), for tests. */
    readonly execLog: string;
    readonly instancesDir: string;
    instanceDir(id: string): string;
    stateFile(id: string): string;
    diskFile(id: string): string;
    snapshotFile(id: string): string;
    /** The simulated guest's console (log source "app"). */
    consoleLog(id: string): string;
  };
  readonly qemu: {
    readonly instancesDir: string;
    instanceDir(id: string): string;
    /** The instance's record: spec, machine layout, observed state, pid. */
    stateFile(id: string): string;
    /** Guest RAM (memory-backend-file); kept while Standby, removed when Stopped. */
    memFile(id: string): string;
    /** qcow2 overlay; its backing file, if any, is a frozen base under basesDir. */
    diskFile(id: string): string;
    /** Device state written by `migrate` at standby (RAM itself stays in memFile). */
    devStateFile(id: string): string;
    /** The guest's serial console (log source "app"). */
    serialLog(id: string): string;
    /** QEMU's stdout/stderr (log source "vmm"). */
    qemuLog(id: string): string;
    pidFile(id: string): string;
    /** < 108 bytes: in the instance dir when that fits, else /run/offshoot/<hash>.sock. */
    qmpSocket(id: string): string;
    /** The guest control channel (virtio-serial port offshoot.ctl); same scheme as qmpSocket. */
    ctlSocket(id: string): string;
    /** The guest agent's channel (virtio-serial port offshoot.agent); same scheme. */
    agentSocket(id: string): string;
    /** Read-only disk images that forks' overlays share; never written after freezing. */
    readonly basesDir: string;
    baseFile(name: string): string;
    /** The guest's config disk: a shell fragment /init reads at boot (command, env, hostname). */
    configFile(id: string): string;
    /** Frozen guest RAM files that forks (and their source) map copy-on-write; never written. */
    readonly memBasesDir: string;
    memBaseFile(name: string): string;
    /** An empty ext4 of `bytes`, the shared backing file of new instances' disks. */
    blankDisk(bytes: number): string;
  };
}

/** sun_path holds 107 bytes plus the NUL. */
const MAX_SOCKET_PATH = 107;

export function checkInstanceId(id: string): string {
  if (!SAFE_ID.test(id)) throw new InvalidRequestError(`invalid instance id "${id}"`);
  return id;
}

/** `simDir`: where the sim keeps its instances; `<root>/sim` unless configured. */
export function agentPaths(root: string, simDir = path.join(root, "sim")): AgentPaths {
  const qemuDir = path.join(root, "qemu");
  return {
    root,
    journal: path.join(root, "journal.jsonl"),
    pidFile: path.join(root, "agent.pid"),
    operationsLogDir: path.join(root, "operations"),
    operationsLog: (id) => path.join(root, "operations", `${checkInstanceId(id)}.log`),
    imagesDir: path.join(root, "images"),
    volumesDir: path.join(root, "volumes"),
    qemu: qemuPaths(qemuDir, "instances"),
    qemuSnapshots: qemuPaths(qemuDir, "snapshots"),
    qemuRestoring: qemuPaths(qemuDir, "restoring"),
    qemuReplaced: qemuPaths(qemuDir, "replaced"),
    sim: simPaths(root, simDir, "instances"),
    simSnapshots: simPaths(root, simDir, "snapshots"),
  };
}

function simPaths(root: string, simDir: string, sub: string): AgentPaths["sim"] {
  const instancesDir = path.join(simDir, sub);
  const instanceDir = (id: string) => path.join(instancesDir, checkInstanceId(id));
  return {
    execLog: path.join(root, "sim-exec.log"),
    instancesDir,
    instanceDir,
    stateFile: (id) => path.join(instanceDir(id), "state.json"),
    diskFile: (id) => path.join(instanceDir(id), "disk.img"),
    snapshotFile: (id) => path.join(instanceDir(id), "snapshot.bin"),
    consoleLog: (id) => path.join(instanceDir(id), "console.log"),
  };
}

/** `sub`: the directory of records ("instances", "snapshots", …); bases are shared by all. */
function qemuPaths(dir: string, sub: string): AgentPaths["qemu"] {
  const instancesDir = path.join(dir, sub);
  const instanceDir = (id: string) => path.join(instancesDir, checkInstanceId(id));
  const basesDir = path.join(dir, "bases");
  return {
    instancesDir,
    instanceDir,
    stateFile: (id) => path.join(instanceDir(id), "state.json"),
    memFile: (id) => path.join(instanceDir(id), "mem"),
    diskFile: (id) => path.join(instanceDir(id), "disk.qcow2"),
    devStateFile: (id) => path.join(instanceDir(id), "devstate"),
    serialLog: (id) => path.join(instanceDir(id), "serial.log"),
    qemuLog: (id) => path.join(instanceDir(id), "qemu.log"),
    pidFile: (id) => path.join(instanceDir(id), "qemu.pid"),
    qmpSocket: (id) => socketPath(instanceDir(id), "qmp"),
    ctlSocket: (id) => socketPath(instanceDir(id), "ctl"),
    agentSocket: (id) => socketPath(instanceDir(id), "agent"),
    basesDir,
    baseFile: (name) => path.join(basesDir, checkInstanceId(name)),
    configFile: (id) => path.join(instanceDir(id), "config.sh"),
    memBasesDir: path.join(dir, "mem-bases"),
    memBaseFile: (name) => path.join(dir, "mem-bases", checkInstanceId(name)),
    blankDisk: (bytes) => path.join(dir, "blank", `${Math.trunc(bytes)}.ext4`),
  };
}

/** `<dir>/<name>.sock` when that fits in sun_path, else /run/offshoot/<hash>.sock. */
function socketPath(dir: string, name: string): string {
  const inDir = path.join(dir, `${name}.sock`);
  if (Buffer.byteLength(inDir) <= MAX_SOCKET_PATH) return inDir;
  // Deterministic, so a restarted agent finds the socket of a guest it did not launch.
  const hash = createHash("sha256").update(inDir).digest("hex").slice(0, 20);
  return path.join("/run/offshoot", `${hash}.sock`);
}
