import type { AgentConfig } from "../config.ts";
import type { AgentPaths } from "../paths.ts";
import type { Driver } from "./driver.ts";
import { SimDriver } from "./sim/sim-driver.ts";

export function createDriver(config: AgentConfig, paths: AgentPaths): Driver {
  switch (config.driver) {
    case "sim":
      return new SimDriver(paths, config.sim);
  }
}
