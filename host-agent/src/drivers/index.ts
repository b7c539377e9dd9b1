import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { z } from "zod";
import type { AgentConfig } from "../config.ts";
import type { ImageStore } from "../images/store.ts";
import type { Logger } from "../log.ts";
import { HostNetwork } from "../network/index.ts";
import type { AgentPaths } from "../paths.ts";
import type { VolumeStore } from "../volumes.ts";
import type { Driver } from "./driver.ts";
import { resolveAccel } from "./qemu/accel.ts";
import { QemuDriver } from "./qemu/qemu-driver.ts";
import { SimDriver } from "./sim/sim-driver.ts";

const VmAssets = z.object({ qemu: z.string(), kernelElf: z.string(), initramfs: z.string() });

export async function createDriver(
  config: AgentConfig,
  paths: AgentPaths,
  log: Logger,
  images: ImageStore,
  volumes: VolumeStore,
): Promise<Driver> {
  switch (config.driver) {
    case "sim":
      return new SimDriver(paths, config.sim);
    case "qemu": {
      // The agent uses the assets a host was provisioned with; it does not build them.
      const manifest = path.join(config.qemu.assetsDir, "assets.json");
      if (!existsSync(manifest)) {
        throw new Error(
          `no guest kernel at ${config.qemu.assetsDir}: run \`node --import tsx scripts/vm-assets.ts\` (or set AGENT_VM_ASSETS)`,
        );
      }
      const assets = VmAssets.parse(JSON.parse(readFileSync(manifest, "utf8")));
      const decision = await resolveAccel(config.qemu.accel, {
        assets,
        workDir: path.join(paths.root, "accel"),
      });
      log("info", "accelerator chosen", { ...decision });
      for (const { source, name } of config.qemu.images) {
        const started = Date.now();
        const image = await images.import(source, name);
        log("info", "image imported", {
          name: image.name,
          digest: image.digest,
          ms: Date.now() - started,
        });
      }
      // Guests' bridge, TAPs and NAT: in AGENT_NETNS, or the agent's own namespace.
      const network = await HostNetwork.open({ netns: config.qemu.netns });
      const driver = new QemuDriver(paths, {
        assets,
        accel: decision.accel,
        images,
        volumes,
        network,
        launchConcurrency: config.qemu.launchConcurrency,
      });
      const { failed, ...adopted } = await driver.adoptNetwork();
      log("info", "guest network ready", { netns: config.qemu.netns ?? "", ...adopted });
      if (failed.length > 0) {
        log("warn", "TAPs not made again (each instance's next launch tries again)", { failed });
      }
      return driver;
    }
  }
}
