// Stop: graceful first — /init SIGTERMs the program and powers off when it has exited — then
// QEMU is quit. The program's own exit status, when it came before the power-off, is kept.
import { setTimeout as sleep } from "node:timers/promises";
import type { ObservedInstance } from "@offshoot/shared";
import { runSteps } from "../../operations/steps.ts";
import type { OpContext } from "../driver.ts";
import { askGuestToStop } from "./control.ts";
import { isOurQemu } from "./discovery.ts";
import { exitEvent, exitMessage, serialSince, stopped } from "./exit.ts";
import { load, type QemuHost } from "./host.ts";
import { dropMemory, gcMemory, quit } from "./processes.ts";

const STOP_TIMEOUT_MS = 10_000;

export async function stop(host: QemuHost, id: string, ctx: OpContext): Promise<ObservedInstance> {
  const rec = await load(host, id);
  let out = stopped(rec, { code: null, message: null });
  await runSteps(ctx.steps, [
    {
      name: "shutdown",
      run: async () => {
        if (rec.pid !== null) await shutdown(host, id, rec.pid);
        // The program's own end, when it came before the power-off (SIGTERM: 143).
        const exit = exitEvent(await serialSince(host, id, rec.serial_offset));
        if (exit)
          out = stopped(rec, { code: exit.code, message: exitMessage(exit.code, exit.oom) });
        await dropMemory(host, id);
        await host.store.write(out);
        if (rec.ram_base !== null) await gcMemory(host);
      },
    },
  ]);
  return out.observed;
}

/** Graceful first: the guest's init SIGTERMs the program and powers off when it has exited.
 * A guest that cannot be asked, or is not gone within stopTimeoutMs, is quit. */
async function shutdown(host: QemuHost, id: string, pid: number): Promise<void> {
  const sock = host.paths.qmpSocket(id);
  const asked = await askGuestToStop(host.paths.ctlSocket(id), { timeoutMs: 2_000 }).catch(
    () => false,
  );
  if (asked) {
    const deadline = Date.now() + (host.options.stopTimeoutMs ?? STOP_TIMEOUT_MS);
    while (isOurQemu(pid, sock) && Date.now() < deadline) await sleep(50);
  }
  await quit(host, id, pid);
}
