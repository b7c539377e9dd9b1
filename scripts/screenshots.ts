// `npm run screenshots`: pictures of the web console for the README, at desktop (1280 px) and
// phone (390 px) width, written to docs/screenshots/. Runs `npm start` with the simulated
// driver on a throwaway data directory and a free port (loopback only), makes a small family
// of instances through the API, then drives Debian's Chromium (apt-get install chromium).
import { type ChildProcess, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium, type Page } from "playwright-core";
import { freePort } from "./postgres.ts";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const OUT = path.join(ROOT, "docs", "screenshots");
const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";

async function startSystem(): Promise<{ url: string; key: string; child: ChildProcess }> {
  const port = await freePort();
  const dataDir = mkdtempSync(path.join(os.tmpdir(), "offshoot-shots-"));
  const child = spawn("node", ["--import", "tsx", "scripts/start.ts"], {
    cwd: ROOT,
    env: {
      ...process.env,
      AGENT_DRIVER: "sim",
      PORT: String(port),
      HOST: "127.0.0.1",
      DATA_DIR: dataDir,
    },
    stdio: ["ignore", "pipe", "inherit"],
    detached: true,
  });
  child.once("exit", () => rmSync(dataDir, { recursive: true, force: true }));
  let key = "";
  let out = "";
  await new Promise<void>((resolve, reject) => {
    child.once("exit", (code) => reject(new Error(`npm start exited (${code}):\n${out}`)));
    child.stdout?.on("data", (d: Buffer) => {
      out += d.toString();
      key ||= /"api_key":"([^"]+)"/.exec(out)?.[1] ?? "";
      if (/"msg":"ready"/.test(out)) resolve();
    });
  });
  return { url: `http://127.0.0.1:${port}`, key, child };
}

async function call(url: string, key: string, method: string, p: string, body?: unknown) {
  const res = await fetch(`${url}${p}`, {
    method,
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) throw new Error(`${method} ${p}: ${res.status} ${await res.text()}`);
  return res.status === 204 ? undefined : ((await res.json()) as { id: string });
}

async function main() {
  const { url, key, child } = await startSystem();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  try {
    // A family: a source, two forks of it (one while it ran), a fork of a fork, one stopped.
    const api = (m: string, p: string, b?: unknown) => call(url, key, m, p, b);
    await api("POST", "/instances", {
      name: "web",
      image: "alpine",
      vcpus: 1,
      tags: { team: "web" },
    });
    await api("POST", "/instances/web/fork", { name: "web-canary", from_running: true });
    await api("POST", "/instances/web/fork", { name: "web-debug", from_running: true });
    await api("POST", "/instances/web-canary/fork", { name: "web-canary-2", from_running: true });
    await api("POST", "/instances", {
      name: "worker",
      image: "alpine",
      vcpus: 1,
      tags: { team: "jobs" },
    });
    await api("POST", "/instances/web-debug/stop");
    await api("POST", "/instances/web/snapshots", { kind: "Standby" });
    mkdirSync(OUT, { recursive: true });
    for (const [suffix, viewport] of [
      ["desktop", { width: 1280, height: 800 }],
      ["phone", { width: 390, height: 844 }],
    ] as const) {
      const page = await (await browser.newContext({ viewport })).newPage();
      const shot = (name: string, full = false) =>
        page.screenshot({ path: path.join(OUT, `${name}-${suffix}.png`), fullPage: full });
      await page.goto(`${url}/console/`);
      await page.getByLabel("API key").fill(key);
      await page.getByRole("button", { name: "Sign in" }).click();
      await page.locator('tr[data-instance="web-canary-2"] .state').getByText("Running").waitFor();
      await shot("instances");
      if (suffix === "phone") {
        await page.close();
        continue;
      }
      await page.getByRole("button", { name: "Fork web-canary", exact: true }).click();
      await page.getByLabel("Name of the fork").fill("web-canary-3");
      await shot("fork-dialog");
      await page.keyboard.press("Escape");
      await openInstance(page, "web-canary");
      await shot("instance", true);
      await page.getByRole("link", { name: "Hosts" }).click();
      await page.locator("tbody tr").first().waitFor();
      await shot("hosts");
      await page.close();
    }
    console.log(`screenshots written to ${path.relative(ROOT, OUT)}/`);
  } finally {
    await browser.close();
    if (child.pid) process.kill(-child.pid, "SIGTERM");
  }
}

async function openInstance(page: Page, name: string) {
  await page.locator(`tr[data-instance="${name}"]`).getByRole("link", { name }).click();
  await page.getByRole("heading", { name: "Lineage" }).waitFor();
  await page
    .getByTestId("logs")
    .getByText(/Running/)
    .first()
    .waitFor();
}

await main();
