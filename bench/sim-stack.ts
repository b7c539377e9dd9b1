// What the control-plane benchmarks (bench/run.ts, bench/replicas.ts) share: a fresh database
// with a tenant, a key and a host, sim agents that connect in-process, an HTTP client, and the
// Standby instance every fork scenario forks.
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { Agent, request } from "node:http";
import { join } from "node:path";
import postgres from "postgres";
import { openPostgres } from "../control-plane/src/db/open.ts";
import {
  createApiKey,
  createHost,
  ensureTenant,
} from "../control-plane/src/services/credentials.ts";
import { type AgentConfig, loadConfig } from "../host-agent/src/index.ts";

export async function freshDatabase(serverUrl: string, name: string): Promise<string> {
  const admin = postgres(serverUrl, { max: 1, onnotice: () => {} });
  await admin.unsafe(`drop database if exists ${name} with (force)`);
  await admin.unsafe(`create database ${name}`);
  await admin.end();
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  return url.toString();
}

/** A fresh, migrated database with one tenant's API key and one host's token. */
export async function benchDatabase(serverUrl: string, name: string) {
  const url = await freshDatabase(serverUrl, name);
  const db = await openPostgres(url, { max: 2 });
  const tenant = await ensureTenant(db.db, "bench");
  const { key } = await createApiKey(db.db, tenant);
  const { token } = await createHost(db.db, "bench-host");
  await db.close();
  return { url, key, token };
}

let tmpfsRoot: string | undefined;

/** The sims' instance files go to tmpfs (/dev/shm) where there is one: they stand in for
 * hypervisor processes, and the benchmark is of the control plane, not of creating a handful
 * of files on the root filesystem (ext4 here, 0.3–1 ms per fork under load). The agents'
 * journals stay on disk, fdatasync'd as in production. */
function simStateDir(hostName: string): string | undefined {
  if (!existsSync("/dev/shm")) return undefined;
  if (!tmpfsRoot) {
    const root = mkdtempSync("/dev/shm/offshoot-bench-sim-");
    process.on("exit", () => rmSync(root, { recursive: true, force: true }));
    tmpfsRoot = root;
  }
  return join(tmpfsRoot, hostName);
}

/** A sim agent's configuration: no latency, no exec log, room for any number of instances. */
export function simAgentConfig(cpUrl: string, token: string, dataDir: string, hostName: string) {
  const stateDir = simStateDir(`${hostName}-${Math.random().toString(36).slice(2, 8)}`);
  return loadConfig({
    CONTROL_PLANE_URL: cpUrl,
    HOST_TOKEN: token,
    AGENT_DATA_DIR: dataDir,
    ...(stateDir && { SIM_STATE_DIR: stateDir }),
    AGENT_HOST_NAME: hostName,
    AGENT_DRIVER: "sim",
    SIM_EXEC_LOG: "0",
    AGENT_VCPUS: "64",
    AGENT_MEMORY: "256GB",
  }) satisfies AgentConfig;
}

// node:http with a keep-alive agent: on a 2-core machine the client's own CPU competes with
// the system under test, and fetch (undici) costs several times more per request.
const keepAlive = new Agent({ keepAlive: true, maxSockets: 64 });

export function http(
  base: string,
  key: string,
  method: string,
  path: string,
  body?: unknown,
): Promise<{ id: string; state: string } | undefined> {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(
      `${base}${path}`,
      {
        method,
        agent: keepAlive,
        headers: {
          authorization: `Bearer ${key}`,
          ...(payload !== undefined && {
            "content-type": "application/json",
            "content-length": Buffer.byteLength(payload),
          }),
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("error", reject);
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          if ((res.statusCode ?? 0) >= 300) {
            reject(new Error(`${method} ${path} → ${res.statusCode} ${text}`));
          } else {
            resolve(text ? (JSON.parse(text) as { id: string; state: string }) : undefined);
          }
        });
      },
    );
    req.on("error", reject);
    req.end(payload);
  });
}

/** Returns once a host accepts instances (a probe instance is made and deleted). */
export async function waitOnline(cpUrl: string, key: string) {
  for (let i = 0; i < 100; i++) {
    try {
      await http(cpUrl, key, "POST", "/instances", {
        name: "probe",
        image: "alpine",
        vcpus: 1,
        size: "64MB",
      });
      await http(cpUrl, key, "DELETE", "/instances/probe");
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  throw new Error("no host came online");
}

/** The fork source every scenario uses: a small instance, put in Standby. */
export async function standbySource(cpUrl: string, key: string) {
  await http(cpUrl, key, "POST", "/instances", {
    name: "src",
    image: "alpine",
    vcpus: 1,
    size: "256MB",
  });
  await http(cpUrl, key, "POST", "/instances/src/standby");
}
