// A real OCI registry on loopback for tests and benchmarks: Debian's `docker-registry` (the
// Distribution registry 2.8) with its own config and storage in a temp dir, and token auth
// from a small token service here, so pulls go through the WWW-Authenticate → token dance as
// they do against Docker Hub (or, with `auth: "basic"`, the registry's own htpasswd). Anonymous clients may pull every repository except the private
// ones; the one user may pull and push everything; wrong credentials get 401 from the token
// service. Every blob byte the registry serves is counted from its access log.
//
//   const reg = await startRegistry({ private: ["secret/app"] });
//   await push(layoutDir, `${reg.host}/public/app:v1`, reg.user);
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { createSign, randomUUID } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { type AddressInfo, createServer as createNetServer } from "node:net";
import os from "node:os";
import path from "node:path";
import { execa } from "execa";

export interface TestRegistry {
  /** "127.0.0.1:PORT": what image names start with. */
  host: string;
  /** Credentials with pull and push on every repository. */
  user: { username: string; password: string };
  /** Blob bytes the registry has sent so far (GET …/blobs/…, from its access log). */
  blobBytesServed(): number;
  /** Where the registry keeps blobs: `blobFile(digest)` is one blob's data. */
  blobFile(digest: string): string;
  /** Stops (SIGSTOP) or resumes (SIGCONT) the registry process: a registry that hangs. */
  signal(sig: "SIGSTOP" | "SIGCONT" | "SIGKILL"): void;
  stop(): Promise<void>;
}

export interface RegistryOptions {
  /** Repositories anonymous clients may not pull (token auth). */
  private?: string[];
  /** "token" (default): the Bearer challenge and the token service here. "basic": the
   * registry's own htpasswd (bcrypt, made with apache2-utils' htpasswd): nothing anonymous. */
  auth?: "token" | "basic";
}

const SERVICE = "offshoot-test-registry";

async function freePort(): Promise<number> {
  const s = createNetServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const { port } = s.address() as AddressInfo;
  await new Promise((r) => s.close(r));
  return port;
}

export async function startRegistry(options: RegistryOptions = {}): Promise<TestRegistry> {
  const dir = mkdtempSync(path.join(os.tmpdir(), "oreg-"));
  const key = path.join(dir, "token.key");
  const cert = path.join(dir, "token.crt");
  execFileSync(
    "openssl",
    [
      "req",
      "-x509",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-days",
      "2",
      "-subj",
      "/CN=offshoot-test-token",
      "-keyout",
      key,
      "-out",
      cert,
    ],
    { stdio: "ignore" },
  );
  const certDer = readFileSync(cert, "utf8").replace(/-----[^-]+-----|\s/g, "");
  const user = { username: "offshoot", password: randomUUID() };
  const privateRepos = new Set(options.private ?? []);

  const tokens = createServer((req, res) => {
    const url = new URL(req.url ?? "/", "http://x");
    const auth = req.headers.authorization;
    let authed = false;
    if (auth) {
      const [u, p] = Buffer.from(auth.replace(/^Basic /, ""), "base64")
        .toString()
        .split(":");
      if (u !== user.username || p !== user.password) {
        res.writeHead(401, { "content-type": "application/json" });
        res.end(JSON.stringify({ details: "wrong username or password" }));
        return;
      }
      authed = true;
    }
    const access = url.searchParams.getAll("scope").flatMap((scope) => {
      const [type, name = "", actions = ""] = scope.split(":");
      const wanted = actions.split(",").filter(Boolean);
      const granted = authed
        ? wanted
        : privateRepos.has(name)
          ? []
          : wanted.filter((a) => a === "pull");
      return type === "repository" ? [{ type, name, actions: granted }] : [];
    });
    const now = Math.floor(Date.now() / 1000);
    const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString("base64url");
    const head = b64({ alg: "RS256", typ: "JWT", x5c: [certDer] });
    const body = b64({
      iss: SERVICE,
      sub: authed ? user.username : "",
      aud: SERVICE,
      exp: now + 600,
      nbf: now - 60,
      iat: now,
      jti: randomUUID(),
      access,
    });
    const sig = createSign("RSA-SHA256")
      .update(`${head}.${body}`)
      .sign(readFileSync(key))
      .toString("base64url");
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ token: `${head}.${body}.${sig}`, expires_in: 600 }));
  });
  await new Promise<void>((r) => tokens.listen(0, "127.0.0.1", r));
  const tokenPort = (tokens.address() as AddressInfo).port;

  const port = await freePort();
  const storage = path.join(dir, "storage");
  const htpasswd = path.join(dir, "htpasswd");
  if (options.auth === "basic") {
    writeFileSync(
      htpasswd,
      execFileSync("htpasswd", ["-Bbn", user.username, user.password]).toString(),
    );
  }
  const auth =
    options.auth === "basic"
      ? ["  htpasswd:", "    realm: offshoot-test", `    path: ${htpasswd}`]
      : [
          "  token:",
          `    realm: http://127.0.0.1:${tokenPort}/token`,
          `    service: ${SERVICE}`,
          `    issuer: ${SERVICE}`,
          `    rootcertbundle: ${cert}`,
        ];
  writeFileSync(
    path.join(dir, "config.yml"),
    [
      "version: 0.1",
      "log:",
      "  level: info",
      "  formatter: json",
      "  accesslog:",
      "    disabled: true",
      "storage:",
      "  filesystem:",
      `    rootdirectory: ${storage}`,
      "  delete:",
      "    enabled: true",
      "http:",
      `  addr: 127.0.0.1:${port}`,
      "auth:",
      ...auth,
      "",
    ].join("\n"),
  );
  let served = 0;
  const proc: ChildProcess = spawn("docker-registry", ["serve", path.join(dir, "config.yml")], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let tail = "";
  let exited = false;
  proc.on("exit", () => {
    exited = true;
  });
  proc.stderr?.setEncoding("utf8").on("data", (chunk: string) => {
    tail += chunk;
    const lines = tail.split("\n");
    tail = lines.pop() ?? "";
    for (const line of lines) {
      if (!line.includes("response completed")) continue;
      try {
        const e = JSON.parse(line) as Record<string, unknown>;
        const uri = String(e["http.request.uri"] ?? "");
        if (e["http.request.method"] === "GET" && uri.includes("/blobs/sha256:")) {
          served += Number(e["http.response.written"] ?? 0);
        }
      } catch {
        // not one of the registry's JSON lines
      }
    }
  });

  const stop = async () => {
    if (!exited) {
      proc.kill("SIGCONT");
      proc.kill("SIGKILL");
      await new Promise((r) => (exited ? r(undefined) : proc.once("exit", r)));
    }
    await new Promise((r) => tokens.close(r));
    rmSync(dir, { recursive: true, force: true });
  };
  // Ready when /v2/ answers (401: it wants a token).
  const deadline = Date.now() + 30_000;
  for (;;) {
    const ok = await fetch(`http://127.0.0.1:${port}/v2/`).then(
      (r) => r.status === 401,
      () => false,
    );
    if (ok) break;
    if (exited || Date.now() > deadline) {
      await stop();
      throw new Error(`docker-registry did not start on port ${port}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    host: `127.0.0.1:${port}`,
    user,
    blobBytesServed: () => served,
    blobFile: (digest) => {
      const hex = digest.replace(/^sha256:/, "");
      return path.join(storage, "docker/registry/v2/blobs/sha256", hex.slice(0, 2), hex, "data");
    },
    signal: (sig) => {
      proc.kill(sig);
    },
    stop,
  };
}

/**
 * Pushes an OCI layout to `dest` ("host:port/repo:tag") with skopeo: as it is (its digests
 * kept), every image of its index (`all`), or converted to Docker's schema 2 (`v2s2`).
 */
export async function push(
  layoutDir: string,
  dest: string,
  creds: { username: string; password: string },
  how: "as-is" | "all" | "v2s2" = "as-is",
): Promise<void> {
  const mode =
    how === "v2s2"
      ? ["--format", "v2s2"]
      : how === "all"
        ? ["--all", "--preserve-digests"]
        : ["--preserve-digests"];
  await execa("skopeo", [
    "--insecure-policy",
    "copy",
    "--quiet",
    "--dest-tls-verify=false",
    "--dest-creds",
    `${creds.username}:${creds.password}`,
    ...mode,
    `oci:${layoutDir}`,
    `docker://${dest}`,
  ]);
}
