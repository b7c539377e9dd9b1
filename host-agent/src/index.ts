export {
  AGENT_VERSION,
  type AgentOptions,
  backoffDelay,
  type RunningAgent,
  startAgent,
} from "./agent.ts";
export { Commands, INTERRUPTED, toResult } from "./commands.ts";
export { type AgentConfig, ConfigError, connectUrl, loadConfig, type SimConfig } from "./config.ts";
export type { Driver, OpContext, OpData, StepRecorder } from "./drivers/driver.ts";
export { createDriver } from "./drivers/index.ts";
export { SimDriver, type SimOptions } from "./drivers/sim/sim-driver.ts";
export { Journal, type JournalEntry, Outcome } from "./journal.ts";
export { type Logger, type LogLevel, stdoutLogger } from "./log.ts";
export { execute } from "./operations/index.ts";
export { InstanceLocks } from "./operations/locks.ts";
export { runSteps, type Step } from "./operations/steps.ts";
export { type AgentPaths, agentPaths } from "./paths.ts";
