// The web console in a real browser (Debian's Chromium, headless) against real processes: a
// control plane on a Postgres server and a sim agent over its WebSocket. What a person does all
// day — sign in, create, fork a running instance, watch the states change without reloading,
// stop, follow logs, open a terminal, delete — and what they must never see: a blank page for a
// wrong key, another tenant's instances, an inaccessible page.
import type { HostView } from "@offshoot/shared";
import type { Browser, Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  consolePage,
  DESKTOP,
  expectAccessible,
  launchBrowser,
  PHONE,
  signIn,
} from "../browser.ts";
import { api, seedTenant } from "../harness.ts";
import { type Stack, startStack } from "./env.ts";

/** What the checks read in the page (page.evaluate's callbacks run in the browser). */
interface Browserish {
  document: { cookie: string; documentElement: { scrollWidth: number; clientWidth: number } };
  localStorage: { length: number };
}

describe("web console (Chromium)", { timeout: 120_000 }, () => {
  let stack: Stack;
  let browser: Browser;
  beforeAll(async () => {
    [stack, browser] = await Promise.all([startStack(), launchBrowser()]);
  });
  afterAll(async () => {
    await browser?.close();
  });

  const row = (page: Page, name: string) => page.locator(`tr[data-instance="${name}"]`);
  const stateOf = (page: Page, name: string) => row(page, name).locator(".state");

  it("creates, forks a running instance, shows both Running without reloading, stops one, follows logs, deletes", async () => {
    const { page, errors } = await consolePage(browser);
    await signIn(page, stack.cp.url, stack.apiKey);
    // Set on this document only: still there at the end means the page never reloaded.
    await page.evaluate(() => {
      (globalThis as unknown as { unreloaded: boolean }).unreloaded = true;
    });

    await page.getByRole("button", { name: "Create instance" }).click();
    const create = page.getByRole("dialog", { name: "Create instance" });
    await create.getByLabel("Name", { exact: true }).fill("web-1");
    await create.getByLabel("Image").fill("alpine");
    await create.getByLabel("vCPUs").fill("1");
    await create.getByLabel(/^Tags/).fill("team=web");
    await create.getByRole("button", { name: "Create", exact: true }).click();
    await expect.poll(() => stateOf(page, "web-1").textContent()).toBe("Running");
    await expect.poll(() => row(page, "web-1").textContent()).toContain("team=web");

    // A name the API would refuse is refused in the dialog, with the rule, and nothing is sent.
    await page.getByRole("button", { name: "Fork web-1" }).click();
    const fork = page.getByRole("dialog", { name: "Fork web-1" });
    const name = fork.getByLabel("Name of the fork");
    expect(await name.inputValue()).toBe("web-1-fork");
    await name.fill("Web_1");
    await fork.getByRole("button", { name: "Fork", exact: true }).click();
    await expect.poll(() => fork.locator("#fork-name-rule").textContent()).toMatch(/lowercase/);
    expect(await name.getAttribute("aria-invalid")).toBe("true");
    await name.fill("web-1-fork");
    // A Running source: from_running is offered, and set.
    expect(await fork.getByLabel(/from_running/).isChecked()).toBe(true);
    await fork.getByRole("button", { name: "Fork", exact: true }).click();
    await row(page, "web-1-fork").waitFor();
    expect(await row(page, "web-1-fork").textContent()).toContain("forked from web-1");
    await expect.poll(() => stateOf(page, "web-1-fork").textContent()).toBe("Running");
    expect(await stateOf(page, "web-1").textContent()).toBe("Running");
    const call = api(stack.cp.url, stack.apiKey);
    const [source, copy] = await Promise.all([
      call("GET", "/instances/web-1"),
      call("GET", "/instances/web-1-fork"),
    ]);
    expect(copy.body).toMatchObject({
      state: "Running",
      forked_from: (source.body as { id: string }).id,
    });

    // A refusal shows the API's own message.
    await page.getByRole("button", { name: "Create instance" }).click();
    await create.getByLabel("Name", { exact: true }).fill("web-1");
    await create.getByLabel("Image").fill("alpine");
    await create.getByRole("button", { name: "Create", exact: true }).click();
    const refused = await call("POST", "/instances", { name: "web-1", image: "alpine" });
    await expect
      .poll(() => create.getByRole("alert").textContent())
      .toContain((refused.body as { message: string }).message);
    await create.getByRole("button", { name: "Cancel" }).click();

    // Stop asks first.
    await page.getByRole("button", { name: "Stop web-1-fork" }).click();
    await page
      .getByRole("dialog", { name: "Stop web-1-fork" })
      .getByRole("button", { name: "Stop" })
      .click();
    await expect.poll(() => stateOf(page, "web-1-fork").textContent()).toBe("Stopped");
    expect(await stateOf(page, "web-1").textContent()).toBe("Running");

    // The filters.
    await page.getByLabel("State").selectOption("Stopped");
    await expect.poll(() => page.locator("tbody tr").count()).toBe(1);
    await page.getByLabel("State").selectOption("");
    // A fork carries its source's tags.
    await page.getByLabel("Tags").fill("team=web");
    await expect.poll(() => page.locator("tbody tr[data-instance]").count()).toBe(2);
    await page.getByLabel("Tags").fill("team=other");
    await page.getByText("No instance matches the filters.").waitFor();
    await page.getByLabel("Tags").fill("");

    // The source's page: its family, and its log followed as it grows.
    await row(page, "web-1").getByRole("link", { name: "web-1" }).click();
    await page.getByRole("heading", { name: "web-1", level: 1 }).waitFor();
    const tree = page.locator(".tree");
    await expect.poll(() => tree.textContent()).toContain("web-1-fork");
    const logs = page.getByTestId("logs");
    await expect.poll(() => logs.textContent()).toMatch(/Running/);
    expect(await logs.textContent()).not.toMatch(/Standby\s*$/);
    expect((await call("POST", "/instances/web-1/standby")).status).toBe(200);
    await expect.poll(() => logs.textContent()).toMatch(/Standby\s*$/);
    await expect.poll(() => page.locator("h1 + .state").textContent()).toBe("Standby");

    // Back to the list; delete asks first, and the row goes.
    await page.getByRole("link", { name: "Instances", exact: true }).first().click();
    await page.getByRole("button", { name: "Delete web-1-fork" }).click();
    await page
      .getByRole("dialog", { name: "Delete web-1-fork" })
      .getByRole("button", { name: "Delete" })
      .click();
    await expect.poll(() => row(page, "web-1-fork").count()).toBe(0);
    expect((await call("GET", "/instances/web-1-fork")).status).toBe(404);

    expect(
      await page.evaluate(() => (globalThis as unknown as { unreloaded?: boolean }).unreloaded),
    ).toBe(true);
    expect(errors).toEqual([]);
  });

  it("shows the API's message for a wrong key, and keeps the key out of the URL", async () => {
    const { page } = await consolePage(browser);
    await page.goto(`${stack.cp.url}/console/`);
    await page.getByLabel("API key").fill("osk_not-a-key");
    await page.getByRole("button", { name: "Sign in" }).click();
    await expect.poll(() => page.getByRole("alert").textContent()).toContain("invalid API key");
    expect(page.url()).not.toContain("osk_");
    // Signed in, the key is in the tab's session storage only.
    await page.getByLabel("API key").fill(stack.apiKey);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("heading", { name: "Instances", level: 1 }).waitFor();
    expect(page.url()).not.toContain(stack.apiKey);
    expect(await page.evaluate(() => (globalThis as unknown as Browserish).document.cookie)).toBe(
      "",
    );
    expect(
      await page.evaluate(() => (globalThis as unknown as Browserish).localStorage.length),
    ).toBe(0);
  });

  it("shows a second tenant none of the first tenant's instances, live or listed", async () => {
    const other = await seedTenant(stack.db);
    const { page } = await consolePage(browser);
    await signIn(page, stack.cp.url, other.apiKey);
    await page.getByText(/^Live/).waitFor();
    expect(await page.locator("tr[data-instance]").count()).toBe(0);
    // One of each tenant's, made after: the other tenant's arrives; the first's never does.
    const mine = api(stack.cp.url, stack.apiKey);
    const theirs = api(stack.cp.url, other.apiKey);
    expect(
      (await mine("POST", "/instances", { name: "private-1", image: "alpine", vcpus: 1 })).status,
    ).toBe(201);
    expect(
      (await theirs("POST", "/instances", { name: "theirs-1", image: "alpine", vcpus: 1 })).status,
    ).toBe(201);
    await row(page, "theirs-1").waitFor();
    await expect.poll(() => stateOf(page, "theirs-1").textContent()).toBe("Running");
    expect(await page.locator("tr[data-instance]").allTextContents()).toHaveLength(1);
    expect(await page.content()).not.toContain("private-1");
    await page.goto(`${stack.cp.url}/console/#/snapshots`);
    await page.getByRole("heading", { name: "Snapshots" }).waitFor();
    expect(await page.content()).not.toContain("private-1");
  });

  it("opens a terminal into the guest and copies text through it", async () => {
    const call = api(stack.cp.url, stack.apiKey);
    const made = await call("POST", "/instances", { name: "term-1", image: "alpine", vcpus: 1 });
    expect(made.status).toBe(201);
    const { page, errors } = await consolePage(browser);
    await signIn(page, stack.cp.url, stack.apiKey);
    await page.goto(`${stack.cp.url}/console/#/instances/${(made.body as { id: string }).id}`);
    await page.getByRole("heading", { name: "term-1", level: 1 }).waitFor();
    // The simulated guest's `cat` echoes its stdin: keys typed reach the guest and its output
    // reaches the screen.
    await page.getByLabel("Command").fill("cat");
    await page.getByRole("button", { name: "Open terminal" }).click();
    await expect
      .poll(() => page.getByRole("status").filter({ hasText: "Connected" }).count())
      .toBe(1);
    await page.getByTestId("terminal").click();
    await page.keyboard.type("hello from the browser\r");
    await expect
      .poll(() => page.locator(".xterm-rows").textContent())
      .toContain("hello from the browser");
    expect(errors).toEqual([]);
  });

  it("takes a snapshot, forks it, deletes it, and shows hosts' capacity", async () => {
    const made = await api(stack.cp.url, stack.apiKey)("POST", "/instances", {
      name: "snap-src",
      image: "alpine",
      vcpus: 1,
    });
    expect(made.status).toBe(201);
    const { page } = await consolePage(browser);
    await signIn(page, stack.cp.url, stack.apiKey);
    await row(page, "snap-src").getByRole("link", { name: "snap-src" }).click();
    await page.getByRole("heading", { name: "snap-src", level: 1 }).waitFor();
    await page.getByLabel("Kind").selectOption("Standby");
    await page.getByRole("button", { name: "Take snapshot" }).click();
    await page.getByText(/^Snapshot .* taken/).waitFor();
    await page.getByRole("link", { name: "Snapshots", exact: true }).first().click();
    await page.getByRole("button", { name: "Fork" }).first().click();
    const dialog = page.getByRole("dialog");
    await dialog.getByLabel("Name of the new instance").fill("from-snap");
    await dialog.getByRole("button", { name: "Fork" }).click();
    await page.getByRole("heading", { name: "from-snap", level: 1 }).waitFor();
    await expect.poll(() => page.locator("h1 + .state").textContent()).toMatch(/Standby|Running/);

    // Deleting the snapshot asks first; the fork made from it stays.
    await page.getByRole("link", { name: "Snapshots", exact: true }).first().click();
    await page.getByRole("button", { name: /^Delete snapshot/ }).click();
    await page.getByRole("dialog").getByRole("button", { name: "Delete" }).click();
    await page.getByText("No snapshots yet.").waitFor();
    expect((await api(stack.cp.url, stack.apiKey)("GET", "/instances/from-snap")).status).toBe(200);

    await page.getByRole("link", { name: "Hosts" }).click();
    const host = page.locator("tbody tr").first();
    await expect.poll(() => host.textContent()).toContain("connected");
    const hosts = (await api(stack.cp.url, stack.apiKey)("GET", "/hosts")).body as HostView[];
    expect(hosts).toHaveLength(1);
    const [h] = hosts;
    expect(h).toMatchObject({ id: stack.hostIds[0], connected: true });
    expect(h?.instances).toBeGreaterThan(0);
    expect(h?.vcpus.allocated).toBeGreaterThan(0);
    expect(h?.vcpus.free).toBe(Math.max(0, (h?.vcpus.total ?? 0) - (h?.vcpus.allocated ?? 0)));
    expect(await host.locator('td[data-label="Your instances"]').textContent()).toBe(
      String(h?.instances),
    );
    // Another tenant sees the same host and its capacity, but none of these instances as its own.
    const other = await seedTenant(stack.db);
    const theirs = (await api(stack.cp.url, other.apiKey)("GET", "/hosts")).body as HostView[];
    expect(theirs.map((t) => [t.id, t.instances, t.vcpus.total])).toEqual([
      [h?.id, 0, h?.vcpus.total],
    ]);
  });

  it("has no serious accessibility violations on any page, at desktop and phone width", async () => {
    // Its own instances: a source, a fork of it, a snapshot (so every page has rows).
    const call = api(stack.cp.url, stack.apiKey);
    expect(
      (await call("POST", "/instances", { name: "a11y-1", image: "alpine", vcpus: 1 })).status,
    ).toBe(201);
    expect(
      (await call("POST", "/instances/a11y-1/fork", { name: "a11y-2", from_running: true })).status,
    ).toBe(201);
    expect((await call("POST", "/instances/a11y-1/snapshots", { kind: "Standby" })).status).toBe(
      201,
    );
    for (const viewport of [DESKTOP, PHONE]) {
      const { page, context } = await consolePage(browser, viewport);
      await page.goto(`${stack.cp.url}/console/`);
      await page.getByLabel("API key").waitFor();
      await expectAccessible(page, `sign-in ${viewport.width}px`);
      await signIn(page, stack.cp.url, stack.apiKey);
      await row(page, "a11y-2").waitFor();
      await expectAccessible(page, `instances ${viewport.width}px`);
      await page.getByRole("button", { name: "Create instance" }).click();
      await expectAccessible(page, `create dialog ${viewport.width}px`);
      await page.keyboard.press("Escape");
      await row(page, "a11y-2").getByRole("link", { name: "a11y-2" }).click();
      await page.getByRole("heading", { name: "Lineage" }).waitFor();
      await expectAccessible(page, `instance page ${viewport.width}px`);
      for (const section of ["Snapshots", "Images", "Hosts"]) {
        await page.getByRole("link", { name: section, exact: true }).click();
        await page.getByRole("heading", { name: section, level: 1 }).waitFor();
        await page.locator("table, .empty").first().waitFor();
        await expectAccessible(page, `${section} ${viewport.width}px`);
      }
      // Nothing wider than the screen at phone width: the tables become cards.
      if (viewport === PHONE) {
        await page.getByRole("link", { name: "Instances", exact: true }).click();
        await row(page, "a11y-2").waitFor();
        const overflow = await page.evaluate(() => {
          const root = (globalThis as unknown as Browserish).document.documentElement;
          return root.scrollWidth - root.clientWidth;
        });
        expect(overflow).toBeLessThanOrEqual(0);
      }
      await context.close();
    }
  });
});
