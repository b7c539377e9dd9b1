// `npm start`: the control plane on the embedded database (or DATABASE_URL) plus one local
// host agent running real QEMU guests, wired together; the agent imports the repo's busybox test
// image (scripts/oci-image.ts) so there is something to boot. AGENT_DRIVER=sim simulates the
// hypervisor instead. Stop with Ctrl-C, SIGTERM or SIGHUP: the whole tree stops (guests keep
// running, by design, and are named on the way out).
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { and, eq, notInArray } from "drizzle-orm";
import { hosts, instances } from "../control-plane/src/db/schema/index.ts";
import { loadEnvOrExit } from "../control-plane/src/env.ts";
import { jsonLog } from "../control-plane/src/log.ts";
import { startServer } from "../control-plane/src/server.ts";
import { createHost } from "../control-plane/src/services/credentials.ts";
import { ensureNetns } from "../host-agent/src/network/netns.ts";
import { buildConsole } from "./build-console.ts";
import { ensureTestImage, TEST_IMAGE } from "./oci-image.ts";
import { ensureVmAssets } from "./vm-assets.ts";

const log = jsonLog("start");
const env = loadEnvOrExit();
// The web console's files (rebuilt only when its sources changed).
if ((await buildConsole()) === "built") log("info", "built the web console");
const server = await startServer(env, jsonLog("control-plane"));
const dataDir = resolve(env.DATA_DIR);
mkdirSync(dataDir, { recursive: true });

// The local agent's token is kept beside the data it guards (hashed in the database).
const tokenFile = join(dataDir, "local-host-token");
let token = existsSync(tokenFile) ? readFileSync(tokenFile, "utf8").trim() : "";
if (!token) {
  token = (await createHost(server.services.db, "local")).token;
  writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
}

const driver = process.env.AGENT_DRIVER ?? "qemu";
// Real VMs need QEMU, the guest kernel and initramfs (installed and built once from Debian's
// packages, then cached) and an image.
let images = process.env.AGENT_IMAGES ?? "";
// Guests' bridge, TAPs and NAT go into a network namespace of their own ("offshoot", made here
// if missing), never into this machine's network: `ip netns exec offshoot curl http://<ip>/`
// reaches a guest. It stays after npm start exits, with the guests that keep running.
const netns = process.env.AGENT_NETNS ?? (driver === "qemu" ? "offshoot" : "");
if (driver === "qemu") {
  await ensureVmAssets();
  images = [`${TEST_IMAGE}=${ensureTestImage()}`, images].filter(Boolean).join(",");
  if (netns) await ensureNetns({ ip: "ip" }, netns, true);
}
const agent = spawn(process.execPath, ["--import", "tsx", "host-agent/src/main.ts"], {
  stdio: ["ignore", "inherit", "inherit"],
  env: {
    ...process.env,
    CONTROL_PLANE_URL: server.url,
    HOST_TOKEN: token,
    AGENT_DATA_DIR: join(dataDir, "agent"),
    AGENT_HOST_NAME: "local",
    AGENT_DRIVER: driver,
    AGENT_IMAGES: images,
    AGENT_NETNS: netns,
    // The agent stops with this process, even one killed too hard to stop it itself.
    AGENT_PARENT_PID: String(process.pid),
  },
});
const agentExited = new Promise<void>((resolve) => agent.once("exit", () => resolve()));
let stopping = false;
const stop = async (code: number, why: string) => {
  if (stopping) return;
  stopping = true;
  log("info", "stopping", { why });
  agent.kill("SIGTERM");
  await agentExited;
  await sayWhatKeepsRunning().catch((e: unknown) =>
    log("warn", "could not list the guests left running", { error: String(e) }),
  );
  await server.close();
  process.exit(code);
};
agent.on("exit", (code) => {
  if (!stopping) {
    log("error", "local agent exited", { code });
    void stop(1, "the local agent exited");
  }
});
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.on(signal, () => void stop(0, signal));
}
// `npm start` runs this under npm and a shell: a SIGTERM to npm ends those two but reaches no
// further, so a parent that is gone means stop.
const parent = process.ppid;
setInterval(() => {
  if (process.ppid !== parent) void stop(0, "the process that started this one exited");
}, 500).unref();

/** Guests outlive their agent by design (a restarted agent re-attaches to them): say which. */
async function sayWhatKeepsRunning(): Promise<void> {
  const [local] = await server.services.db
    .select({ id: hosts.id })
    .from(hosts)
    .where(eq(hosts.name, "local"));
  if (!local) return;
  const running = await server.services.db
    .select({ name: instances.name, state: instances.state })
    .from(instances)
    .where(
      and(eq(instances.hostId, local.id), notInArray(instances.state, ["Stopped", "Standby"])),
    );
  if (running.length === 0) return;
  log("info", "guests keep running after this exits; the next npm start re-attaches to them", {
    guests: running.map((r) => `${r.name} (${r.state})`),
    stop_them_first: "POST /instances/{name}/stop, or DELETE /instances/{name}",
  });
}

// "ready" once the agent has connected, so that a request right after it finds the host.
const spawnedAt = new Date(Date.now() - 1000); // the database's clock may be a little behind
for (let waited = 0; ; waited += 100) {
  const [local] = await server.services.db
    .select({ status: hosts.status, connectedAt: hosts.connectedAt })
    .from(hosts)
    .where(eq(hosts.name, "local"));
  if (local?.status === "online" && local.connectedAt && local.connectedAt >= spawnedAt) break;
  if (stopping) await new Promise<never>(() => {}); // stop() ends the process
  if (waited === 60_000) log("warn", "the local agent has not connected after 60 s; waiting");
  await new Promise((r) => setTimeout(r, 100));
}
log("info", "ready", {
  api: server.url,
  console: `${server.url}/console/`,
  docs: `${server.url}/docs`,
  agent_driver: driver,
  note:
    driver === "sim"
      ? "the local host runs the simulated driver: instances are simulated, not real VMs"
      : `real QEMU guests; the image ${TEST_IMAGE} is imported (GET /images); guests' addresses are reachable inside the network namespace ${netns || "of this host"}${netns ? ` (ip netns exec ${netns} …)` : ""}`,
});
