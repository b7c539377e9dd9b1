// Preconditions that hold for every hypervisor, checked before a driver is called so that each
// driver need not repeat them (and cannot disagree about them).
import {
  ApiError,
  type DriverCapabilities,
  formatSize,
  type InstanceSpec,
  InvalidRequestError,
  InvalidStateError,
  NotFoundError,
  NotSupportedError,
  type ObservedInstance,
  VERB_FROM,
} from "@offshoot/shared";
import type { Driver } from "../drivers/driver.ts";

export async function requireInstance(driver: Driver, id: string): Promise<ObservedInstance> {
  const instance = await driver.get(id);
  if (!instance) throw new NotFoundError(`instance ${id} not found on this host`);
  return instance;
}

/** Unknown is in no verb's list: only delete is safe while the host's view is missing. */
export async function requireState(
  driver: Driver,
  id: string,
  verb: keyof typeof VERB_FROM,
): Promise<ObservedInstance> {
  const instance = await requireInstance(driver, id);
  const allowed = VERB_FROM[verb];
  if (!allowed.includes(instance.state)) {
    throw new InvalidStateError(
      `cannot ${verb} instance ${id} in state ${instance.state} (needs ${allowed.join(" or ")})`,
    );
  }
  return instance;
}

export async function requireAbsent(driver: Driver, id: string): Promise<void> {
  if (await driver.get(id))
    throw new ApiError("conflict", `instance ${id} already exists on this host`);
}

/** The spec asks only for what this driver can do. */
export function checkSpec(caps: DriverCapabilities, spec: InstanceSpec): void {
  const missing = (what: string) =>
    new NotSupportedError(`the host's driver does not support ${what}`);
  if (!caps.hypervisors.includes(spec.hypervisor)) throw missing(`hypervisor ${spec.hypervisor}`);
  if (spec.volumes.length > 0 && !caps.volumes) throw missing("volumes");
  if (spec.disk_io_bps !== null && !caps.disk_io_limit) throw missing("disk I/O limits");
  if (spec.hotplug_bytes > 0 && !caps.hotplug_memory) throw missing("memory hotplug");
  if (spec.memory_bytes < caps.min_memory_bytes) {
    throw new InvalidRequestError(
      `size ${formatSize(spec.memory_bytes)} is below the smallest guest this host boots (${formatSize(caps.min_memory_bytes)})`,
    );
  }
}
