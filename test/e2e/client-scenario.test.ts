import { beforeAll, describe, expect, it } from "vitest";
import { hypeman } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";
import { clientScenario } from "./scenarios.ts";

// The whole lifecycle through the official Hypeman client, unmodified, against real
// processes: control plane + sim agent over WebSocket + Postgres server.
describe("official @onkernel/hypeman client", () => {
  let stack: Stack;
  let client: ReturnType<typeof hypeman>;
  beforeAll(async () => {
    stack = await startStack();
    client = hypeman(stack.cp.url, stack.apiKey);
  });

  it("runs create → get → list → stop → start → standby → restore → fork ×9 → delete", () =>
    clientScenario(client));

  it("serves an OpenAPI document built from the same schemas, and a reference page", async () => {
    const doc = (await (await fetch(`${stack.cp.url}/openapi.json`)).json()) as {
      paths: Record<string, Record<string, unknown>>;
      components: { schemas: Record<string, { properties?: Record<string, unknown> }> };
    };
    expect(Object.keys(doc.paths)).toEqual(
      expect.arrayContaining([
        "/instances",
        "/instances/{id}",
        "/instances/{id}/fork",
        "/instances/{id}/wait",
      ]),
    );
    expect(Object.keys(doc.paths["/instances/{id}/fork"] ?? {})).toEqual(["post"]);
    // The contract's 22 fields, expires_at, which the official client requires, and two
    // extensions: forked_from and host_id.
    const fields = Object.keys(doc.components.schemas.Instance?.properties ?? {});
    expect(fields.length).toBe(25);
    expect(fields).toContain("forked_from");
    expect(fields).toContain("host_id");
    expect(Object.keys(doc.paths)).toContain("/hosts");
    const page = await fetch(`${stack.cp.url}/docs`);
    expect(page.headers.get("content-type")).toMatch(/text\/html/);
    expect(await page.text()).toContain("/openapi.json");
  });
});
