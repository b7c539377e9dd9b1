import os from "node:os";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { connectUrl, loadConfig } from "./config.ts";

const base = { CONTROL_PLANE_URL: "http://127.0.0.1:8080", HOST_TOKEN: "t", AGENT_DRIVER: "sim" };

describe("config", () => {
  it("applies defaults", () => {
    expect(loadConfig(base)).toEqual({
      connectUrls: ["ws://127.0.0.1:8080/agent/v1/connect"],
      hostToken: "t",
      dataDir: path.resolve(".data/agent"),
      hostName: os.hostname(),
      driver: "sim",
      capacity: { vcpus: os.cpus().length, memory_bytes: os.totalmem() },
      sim: { latencyMs: 0, fail: {}, execLog: true },
      pulls: {
        maxLayerBytes: 8 * 1024 ** 3,
        idleTimeoutMs: 30_000,
        insecure: [],
        concurrency: 2,
        cacheBytes: 50 * 1024 ** 3,
        rootfsFormat: "erofs",
      },
      qemu: {
        accel: "auto",
        assetsDir: path.resolve(".data/vm-assets"),
        images: [],
        netns: null,
        launchConcurrency: 16,
      },
    });
  });

  it("parses every variable", () => {
    const config = loadConfig({
      ...base,
      AGENT_DATA_DIR: "/var/lib/offshoot",
      AGENT_HOST_NAME: "rack-1",
      AGENT_VCPUS: "64",
      AGENT_MEMORY: "256GB",
      SIM_LATENCY_MS: '{"fork":2000,"create":50}',
      SIM_FAIL: '{"restore":"internal_error"}',
      SIM_EXEC_LOG: "0",
    });
    expect(config).toMatchObject({
      dataDir: "/var/lib/offshoot",
      hostName: "rack-1",
      capacity: { vcpus: 64, memory_bytes: 256 * 1024 ** 3 },
      sim: {
        latencyMs: { fork: 2000, create: 50 },
        fail: { restore: "internal_error" },
        execLog: false,
      },
    });
    expect(loadConfig({ ...base, SIM_LATENCY_MS: "25" }).sim.latencyMs).toBe(25);
    expect(loadConfig({ ...base, SIM_STATE_DIR: "/dev/shm/sim" }).sim.stateDir).toBe(
      "/dev/shm/sim",
    );
    expect(
      loadConfig({ ...base, AGENT_IMAGES: "/img/a, alpine:3=/img/b.tar" }).qemu.images,
    ).toEqual([{ source: "/img/a" }, { source: "/img/b.tar", name: "alpine:3" }]);
  });

  it("takes several control-plane URLs, one per replica", () => {
    expect(
      loadConfig({ ...base, CONTROL_PLANE_URL: "http://a:8080, https://b/cp ,," }).connectUrls,
    ).toEqual(["ws://a:8080/agent/v1/connect", "wss://b/cp/agent/v1/connect"]);
  });

  it("maps http(s) to ws(s) and keeps a base path", () => {
    expect(connectUrl("https://cp.example.com/")).toBe("wss://cp.example.com/agent/v1/connect");
    expect(connectUrl("http://cp:8080/offshoot")).toBe("ws://cp:8080/offshoot/agent/v1/connect");
  });

  it.each([
    [{ HOST_TOKEN: undefined }, "HOST_TOKEN: is required"],
    [{ CONTROL_PLANE_URL: "cp:8080" }, "CONTROL_PLANE_URL: must be an http(s):// or ws(s):// URL"],
    [{ AGENT_DRIVER: undefined }, 'AGENT_DRIVER: is required: "qemu"'],
    [{ AGENT_DRIVER: "firecracker" }, 'AGENT_DRIVER: "firecracker" is not available'],
    [{ AGENT_DRIVER: "qemu", AGENT_ACCEL: "hvf" }, "AGENT_ACCEL:"],
    [{ AGENT_VCPUS: "many" }, "AGENT_VCPUS: must be a positive integer"],
    [{ AGENT_VCPUS: "0" }, "AGENT_VCPUS: must be a positive integer"],
    [{ AGENT_MEMORY: "16 potatoes" }, 'AGENT_MEMORY: invalid size "16 potatoes"'],
    [{ SIM_LATENCY_MS: "{fork:1}" }, "SIM_LATENCY_MS: expected JSON like"],
    [{ SIM_LATENCY_MS: '{"frok":1}' }, "SIM_LATENCY_MS: "],
    [{ SIM_FAIL: '{"fork":"oops"}' }, "SIM_FAIL: fork: "],
    [{ AGENT_IMAGES: "Not A Ref=/x" }, 'AGENT_IMAGES: "Not A Ref" is not an image reference'],
    [{ SIM_EXEC_LOG: "yes" }, 'SIM_EXEC_LOG: must be "1", "0", "true" or "false"'],
    [{ AGENT_NETNS: "../etc" }, "AGENT_NETNS: must be a network namespace name"],
    [{ AGENT_NETNS: ".." }, "AGENT_NETNS: must be a network namespace name"],
  ])("names the first wrong variable: %o", (patch, message) => {
    expect(() => loadConfig({ ...base, ...patch })).toThrow(message);
  });
});
