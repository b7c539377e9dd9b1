// `wrangler dev` as a child process: the Worker (control-plane/src/worker/) on workerd, its
// Hyperdrive binding pointed at a Postgres database. For tests and benchmarks.
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { freePort, REPO_ROOT, waitFor } from "./harness.ts";

const WRANGLER = path.join(REPO_ROOT, "node_modules", ".bin", "wrangler");

export interface Wrangler {
  url: string;
  output(): string;
  stop(): Promise<void>;
}

export async function wranglerDev(
  databaseUrl: string,
  vars: Record<string, string> = {},
): Promise<Wrangler> {
  // Hyperdrive insists on a password in the URL; the test server trusts local connections, so
  // any will do.
  const withPassword = new URL(databaseUrl);
  if (!withPassword.password) withPassword.password = "local";
  const port = await freePort();
  const inspector = await freePort();
  // Durable Object storage of this run only.
  const persist = mkdtempSync(path.join(os.tmpdir(), "offshoot-wrangler-"));
  let out = "";
  const child: ChildProcess = spawn(
    WRANGLER,
    [
      "dev",
      "--ip",
      "127.0.0.1",
      "--port",
      String(port),
      "--inspector-port",
      String(inspector),
      ...Object.entries({
        HEARTBEAT_MS: "200",
        HOST_GRACE_MS: "3000",
        COMMAND_TIMEOUT_MS: "30000",
        ...vars,
      }).flatMap(([k, v]) => ["--var", `${k}:${v}`]),
      "--persist-to",
      persist,
    ],
    {
      cwd: REPO_ROOT,
      env: {
        ...process.env,
        WRANGLER_SEND_METRICS: "false",
        CLOUDFLARE_CF_FETCH_ENABLED: "false",
        CLOUDFLARE_HYPERDRIVE_LOCAL_CONNECTION_STRING_HYPERDRIVE: withPassword.toString(),
        NO_COLOR: "1",
        NODE_OPTIONS: `--require ${path.join(REPO_ROOT, "scripts", "wrangler-socket-guard.cjs")}`,
      },
      stdio: ["ignore", "pipe", "pipe"],
      detached: true,
    },
  );
  child.stdout?.on("data", (d: Buffer) => {
    out += d.toString();
  });
  child.stderr?.on("data", (d: Buffer) => {
    out += d.toString();
  });
  const url = `http://127.0.0.1:${port}`;
  await waitFor(
    async () => {
      if (child.exitCode !== null) throw new Error(`wrangler dev exited:\n${out}`);
      return fetch(`${url}/health`).then(
        (r) => r.ok,
        () => false,
      );
    },
    { timeoutMs: 60_000, what: `wrangler dev to answer on ${url}` },
  );
  return {
    url,
    output: () => out,
    stop: async () => {
      if (child.exitCode !== null || !child.pid) return;
      const exited = new Promise((r) => child.once("exit", r));
      process.kill(-child.pid, "SIGTERM");
      const timer = setTimeout(() => child.pid && process.kill(-child.pid, "SIGKILL"), 5_000);
      await exited;
      clearTimeout(timer);
      rmSync(persist, { recursive: true, force: true });
    },
  };
}
