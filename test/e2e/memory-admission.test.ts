// Memory admission counts what guests really cost their host: a guest its host reports as
// sharing memory (a fork mapping a shared base) is charged the private bytes the host measured,
// not its size; and whatever the charges say, a host whose reported available memory is below
// its reserve refuses. A hand-driven agent plays the host and reports what the test says.
import { PROTOCOL_VERSION } from "@offshoot/shared";
import { beforeAll, describe, expect, it } from "vitest";
import { hosts, instances } from "../../control-plane/src/db/schema/index.ts";
import { type FakeAgent, fakeAgent, isCommand, isWelcome } from "../fake-agent.ts";
import { api, hostOnline, registerHost, waitFor } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

const MiB = 1024 * 1024;

describe("memory admission", () => {
  let stack: Stack;
  let call: ReturnType<typeof api>;
  let host: FakeAgent;
  const answered = new Set<string>();

  beforeAll(async () => {
    stack = await startStack({ agents: [] });
    call = api(stack.cp.url, stack.apiKey);
    const { hostId, token } = await registerHost(stack.db);
    host = await fakeAgent(stack.cp.url, token);
    host.hello({ capacity: { vcpus: 64, memory_bytes: 1024 * MiB } });
    await host.next(isWelcome);
    await hostOnline(stack.db, hostId);
  });

  /** Creates a 256 MiB instance, the fake host answering its create as done. */
  const create = async (name: string) => {
    const pending = call("POST", "/instances", { name, image: "alpine", size: "256MB" });
    const cmd = await Promise.race([
      host.next(
        (m): m is Extract<typeof m, { type: "command" }> =>
          isCommand(m) && !answered.has(m.id) && m.op.kind === "create",
      ),
      pending.then(() => undefined),
    ]);
    if (cmd && cmd.op.kind === "create") {
      answered.add(cmd.id);
      host.send({
        v: PROTOCOL_VERSION,
        type: "result",
        command_id: cmd.id,
        ok: true,
        instances: [{ id: cmd.op.instance.id, state: "Running", has_snapshot: false }],
      });
    }
    return pending;
  };
  /** Sends a memory report and waits until the control plane has recorded it. */
  const report = async (available: number, charges: { id: string; bytes: number }[]) => {
    host.send({ v: PROTOCOL_VERSION, type: "memory", available_bytes: available, charges });
    await waitFor(async () => {
      const [h] = await stack.db.select().from(hosts);
      return h?.memoryAvailableBytes === available;
    });
  };

  it("charges sharing guests their private bytes, and refuses below the host's reserve", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 4; i++) {
      const r = await create(`m-${i}`);
      expect(r.status, JSON.stringify(r.body)).toBe(201);
      ids.push((r.body as { id: string }).id);
    }
    // Four guests of 256 MiB fill the 1 GiB the host offers.
    const full = await create("m-4");
    expect(full.status).toBe(409);
    expect(full.body).toMatchObject({ code: "insufficient_resources" });

    // The host says they share memory and hold 10 MiB each: room again.
    await report(
      20 * 1024 * MiB,
      ids.map((id) => ({ id, bytes: 10 * MiB })),
    );
    const admitted = await create("m-4");
    expect(admitted.status, JSON.stringify(admitted.body)).toBe(201);
    const charges = await stack.db.select().from(instances);
    expect(
      charges
        .filter((r) => r.memoryChargeBytes === 10 * MiB)
        .map((r) => r.id)
        .sort(),
    ).toEqual([...ids].sort());

    // A host that says it is nearly out of memory refuses whatever the charges.
    await report(
      300 * MiB,
      ids.map((id) => ({ id, bytes: 10 * MiB })),
    );
    const refused = await create("m-5");
    expect(refused.status).toBe(409);
    expect(JSON.stringify(refused.body)).toMatch(/of memory available and keeps 256MB in reserve/);

    // A guest left out of a report is charged its size again: with room in memory, the
    // charges of four and the fifth's size fill 1 GiB once more.
    await report(
      20 * 1024 * MiB,
      ids.slice(1).map((id) => ({ id, bytes: 10 * MiB })),
    );
    const again = await create("m-6");
    expect(again.status).toBe(201);
    const last = await create("m-7");
    expect(last.status).toBe(409);
    expect(JSON.stringify(last.body)).toMatch(/free/);
  });
});
