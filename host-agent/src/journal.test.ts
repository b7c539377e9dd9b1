import { appendFile, readFile, writeFile } from "node:fs/promises";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { command, memoryLogger, SIM_DEFAULTS, spec, tempDir, waitFor } from "../testing/index.ts";
import { Commands } from "./commands.ts";
import { SimDriver } from "./drivers/sim/sim-driver.ts";
import { Journal, type Outcome } from "./journal.ts";
import { agentPaths } from "./paths.ts";

const ok: Outcome = { ok: true, instances: [] };
const stopCmd = (id: string) => command(id, { kind: "stop", instance_id: "i1" });

async function lines(file: string): Promise<string[]> {
  return (await readFile(file, "utf8")).split("\n").filter(Boolean);
}

describe("journal", () => {
  it("persists started, steps and done, and reloads them", async () => {
    const file = path.join(await tempDir(), "journal.jsonl");
    const j = await Journal.open(file);
    await j.begin(stopCmd("c1"));
    await j.step("c1", "shutdown");
    await j.begin(stopCmd("c2"));
    await j.finish("c1", ok);
    await j.close();

    expect((await lines(file)).map((l) => JSON.parse(l).status)).toEqual([
      "started",
      "step",
      "started",
      "done",
    ]);
    const again = await Journal.open(file);
    expect(again.get("c1")).toMatchObject({ steps: ["shutdown"], result: ok });
    expect(again.unfinished().map((e) => e.id)).toEqual(["c2"]);
    await again.close();
  });

  it("tolerates a torn last line and appends cleanly after it", async () => {
    const file = path.join(await tempDir(), "journal.jsonl");
    const j = await Journal.open(file);
    await j.begin(stopCmd("c1"));
    await j.finish("c1", ok);
    await j.close();
    await appendFile(file, '{"id":"c2","status":"star'); // kill -9 mid-write

    const again = await Journal.open(file);
    expect(again.get("c1")?.result).toEqual(ok);
    expect(again.get("c2")).toBeUndefined();
    await again.begin(stopCmd("c3"));
    await again.close();
    const reread = await Journal.open(file);
    expect(reread.unfinished().map((e) => e.id)).toEqual(["c3"]);
    await reread.close();
    expect((await lines(file)).every((l) => JSON.parse(l))).toBe(true);
  });

  it("keeps a complete last record that lost only its newline", async () => {
    const file = path.join(await tempDir(), "journal.jsonl");
    await writeFile(file, JSON.stringify({ id: "c1", status: "started", command: stopCmd("c1") }));
    const j = await Journal.open(file);
    await j.finish("c1", ok);
    await j.close();
    const again = await Journal.open(file);
    expect(again.get("c1")?.result).toEqual(ok);
    await again.close();
  });

  it("refuses a journal corrupt before its last line", async () => {
    const file = path.join(await tempDir(), "journal.jsonl");
    const good = JSON.stringify({ id: "c1", status: "started", command: stopCmd("c1") });
    await writeFile(file, `${good}\nnot json\n${good}\n`);
    await expect(Journal.open(file)).rejects.toThrow(/line 2 is corrupt/);
  });

  it("compacts to the newest results and keeps unfinished commands", async () => {
    const file = path.join(await tempDir(), "journal.jsonl");
    const keep = 3;
    const j = await Journal.open(file, { keep });
    await j.begin(stopCmd("open"));
    await j.step("open", "half");
    for (let i = 1; i <= 2 * keep; i++) {
      await j.begin(stopCmd(`c${i}`));
      await j.finish(`c${i}`, {
        ok: false,
        error: { code: "invalid_state", message: `n${i}` },
        instances: [],
      });
    }
    await j.begin(stopCmd("after")); // queued behind the compaction

    const ids = (await lines(file)).map((l) => JSON.parse(l).id);
    expect(new Set(ids)).toEqual(new Set(["open", "c4", "c5", "c6", "after"]));
    expect(j.get("c3")).toBeUndefined();
    expect(j.get("c6")?.result).toMatchObject({ error: { message: "n6" } });
    await j.close();

    const again = await Journal.open(file, { keep });
    expect(again.get("c4")?.result).toMatchObject({ error: { message: "n4" } });
    expect(again.get("c1")).toBeUndefined();
    expect(again.unfinished().map((e) => [e.id, e.steps])).toEqual([
      ["open", ["half"]],
      ["after", []],
    ]);
    await again.close();
  });
});

describe("commands answered from the journal", () => {
  it("replays a finished command instead of executing it again, even after a restart", async () => {
    const dir = await tempDir();
    const paths = agentPaths(dir);
    const { log } = memoryLogger();
    const results: unknown[] = [];
    const create = command("cmd-create", { kind: "create", instance: spec("i1") });

    const journal = await Journal.open(paths.journal);
    const commands = new Commands(journal, new SimDriver(paths, SIM_DEFAULTS), log, (r) =>
      results.push(r),
    );
    expect(commands.handle(create)).toBe("started");
    expect(commands.handle(create)).toBe("in_flight");
    await waitFor("the first result", () => results.length === 1);
    expect(commands.handle(create)).toBe("replayed");
    await journal.close();

    const reopened = await Journal.open(paths.journal);
    const after = new Commands(reopened, new SimDriver(paths, SIM_DEFAULTS), log, (r) =>
      results.push(r),
    );
    expect(after.handle(create)).toBe("replayed");
    await reopened.close();

    expect(results).toEqual([
      expect.objectContaining({ command_id: "cmd-create", ok: true, replayed: false }),
      expect.objectContaining({ command_id: "cmd-create", ok: true, replayed: true }),
      expect.objectContaining({ command_id: "cmd-create", ok: true, replayed: true }),
    ]);
    const executed = await lines(paths.sim.execLog);
    expect(executed.map((l) => JSON.parse(l).command_id)).toEqual(["cmd-create"]);
  });
});
