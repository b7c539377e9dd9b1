// An agent restart's view of its guests' TAPs: each instance's made again or adopted (never a
// second one) with its limits, and a TAP no instance owns removed. Real kernel objects in a
// namespace the test makes; no guest needed (a TAP exists without its QEMU).
import { mkdtempSync, rmSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TestNamespaces } from "../../../testing/netns.ts";
import { testGuestSpec } from "../../../testing/qemu.ts";
import { HostNetwork } from "../../network/index.ts";
import { InstanceLocks } from "../../operations/locks.ts";
import { agentPaths } from "../../paths.ts";
import { Slots } from "../../slots.ts";
import type { QemuHost } from "./host.ts";
import { adoptNics, prepareNic, removeNic } from "./nic.ts";
import { type QemuRecord, QemuStore } from "./store.ts";

const SUBNET = "10.64.16.0/20";

describe("guest NICs across an agent restart", () => {
  const spaces = new TestNamespaces();
  const root = mkdtempSync(path.join(os.tmpdir(), "onic-"));
  let ns = "";

  beforeAll(async () => {
    ns = await spaces.create("nic");
  });
  afterAll(async () => {
    await spaces.cleanup();
    rmSync(root, { recursive: true, force: true });
  });

  /** A driver's shared state as a fresh agent has it: records on disk, nothing prepared. */
  const freshHost = async (): Promise<QemuHost> => {
    const paths = agentPaths(root).qemu;
    const host: QemuHost = {
      paths,
      store: new QemuStore(paths),
      options: {
        assets: { qemu: "", kernelElf: "", initramfs: "" },
        accel: "tcg",
        images: undefined as never,
        network: await HostNetwork.open({ netns: ns }),
      },
      tools: { qemuImg: "" },
      qmps: new Map(),
      subnets: new Map(),
      nics: new Map(),
      links: new Map(),
      emit: () => {},
      last: { copyPath: undefined, diskClone: undefined, identityMs: undefined },
      views: {} as QemuHost["views"],
      launches: new Slots(2),
      payloads: new InstanceLocks(),
      thawUsers: new Map(),
    };
    host.views.instances = host;
    return host;
  };
  const record = (id: string, ip: string, downloadBps: number | null): QemuRecord => {
    const spec = testGuestSpec(id, {}, "02:00:00:00:10:01", { ip, subnet: SUBNET });
    spec.network.bandwidth_download_bps = downloadBps;
    return {
      created_by: "test",
      spec,
      image: {
        name: "localhost/offshoot/busybox:latest",
        digest: `sha256:${"0".repeat(64)}`,
        platform: "linux/amd64",
        size_bytes: 0,
        entrypoint: null,
        cmd: ["/usr/bin/count"],
        env: {},
        working_dir: null,
        user: null,
        created_at: "2026-01-01T00:00:00Z",
        rootfs: "/nonexistent",
      },
      machine: { memory_mib: 256, vcpus: 1, mac: "02:00:00:00:10:01", agent_port: true },
      observed: { id, state: "Stopped", has_snapshot: false, state_error: null },
      pid: null,
      ram: "file",
      ram_base: null,
      disk_base: null,
      compressed: null,
      guest_identity: null,
      serial_offset: 0,
    };
  };

  it("makes or adopts each instance's TAP once, with its limits, and removes strays", async () => {
    const before = await freshHost();
    const net = before.options.network as HostNetwork;
    const kept = record("keptinstance1", "10.64.16.2", 2_000_000);
    const fresh = record("freshinstance", "10.64.16.3", null);
    // kept's TAP exists from an earlier life; fresh's does not; a deleted instance left one.
    await prepareNic(before, kept);
    await net.ensureTap("deletedinstanc", { downloadBps: null, uploadBps: null });
    for (const r of [kept, fresh]) {
      await mkdir(before.paths.instanceDir(r.observed.id), { recursive: true });
      await before.store.write(r);
    }

    const after = await freshHost();
    const first = await adoptNics(after);
    expect(first).toEqual({ taps: 2, removed: 1, failed: [] });
    const taps = await net.listTaps();
    expect(taps).toEqual([net.tapName("freshinstance"), net.tapName("keptinstance1")].sort());
    expect(await net.limits("keptinstance1")).toEqual({ downloadBps: 2_000_000, uploadBps: null });

    // Again (another restart): nothing new, nothing removed.
    expect(await adoptNics(await freshHost())).toEqual({ taps: 2, removed: 0, failed: [] });
    expect(await net.listTaps()).toEqual(taps);

    // Deleting an instance takes its TAP.
    await removeNic(after, "freshinstance");
    expect(await net.listTaps()).toEqual([net.tapName("keptinstance1")]);
  });
});
