import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { Operation } from "@offshoot/shared";
import { describe, expect, it } from "vitest";
import { tempDir } from "../testing/index.ts";
import { OperationsLog } from "./operations-log.ts";

const stop = (id: string): Operation => ({ kind: "stop", instance_id: id });

describe("operations log", () => {
  it("writes queued lines in order, per instance, and a reader can wait for them", async () => {
    const dir = join(await tempDir(), "ops"); // made by the first append
    const log = new OperationsLog(
      (id) => join(dir, `${id}.log`),
      () => {},
    );
    for (let i = 0; i < 20; i++) log.note(stop("a"), `line ${i}`);
    log.note(
      { kind: "fork", source_id: "a", target: { id: "b" } as never, target_state: "Stopped" },
      "fork ok",
    );
    await log.settled();
    const lines = (await readFile(join(dir, "a.log"), "utf8")).trim().split("\n");
    expect(lines.map((l) => l.replace(/^\S+ /, ""))).toEqual([
      ...Array.from({ length: 20 }, (_, i) => `line ${i}`),
      "fork ok",
    ]);
    expect(await readFile(join(dir, "b.log"), "utf8")).toMatch(/^\S+Z fork ok\n$/);

    log.note({ kind: "delete", instance_id: "a" }, "delete ok");
    await log.settled();
    await expect(readFile(join(dir, "a.log"))).rejects.toThrow(/ENOENT/);
  });

  it("reports a line it cannot write and goes on with the next", async () => {
    const root = await tempDir();
    await writeFile(join(root, "file"), "not a directory");
    const warnings: string[] = [];
    const log = new OperationsLog(
      (id) => (id === "bad" ? join(root, "file", "x.log") : join(root, `${id}.log`)),
      (level, msg) => warnings.push(`${level} ${msg}`),
    );
    log.note(stop("bad"), "lost");
    log.note(stop("good"), "kept");
    await log.settled();
    expect(warnings).toEqual(["warn operations log write failed"]);
    expect(await readFile(join(root, "good.log"), "utf8")).toMatch(/kept/);
  });
});
