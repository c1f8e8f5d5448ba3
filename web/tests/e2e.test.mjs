// The operator UI end to end: Debian's chromium (playwright-core) against live
// `agentrun dev` stacks on the PostgreSQL cluster scripts/web-test.sh started. The
// scenarios run in order on one stack (A); the wrong-key test has a stack of its own with
// --auth (C); the last scenario restarts the manager under an open run page (A -> B).
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { env, freePort, launchBrowser, missingSetup, startDev, until } from "./harness.mjs";

const skip = missingSetup();
const RUN_URL = /#\/runs\/([0-9a-f-]{36})/;

/** Creates a run with the "New run" form and returns its id (the page is then the run's). */
async function createRunFromUi(page, ui, prompt) {
  await page.goto(`${ui}#/runs`);
  await page.getByRole("button", { name: "New run" }).click();
  await page.locator("form.new-run textarea[name=prompt]").fill(prompt);
  await page.getByRole("button", { name: "Create run" }).click();
  await page.waitForURL(RUN_URL, { timeout: 15_000, waitUntil: "commit" });
  return RUN_URL.exec(page.url())[1];
}

/** What the run page shows: status, events held, last seq, stream state, reply. */
async function runView(page) {
  return page.evaluate(() => {
    const count = document.querySelector("[data-testid=event-count]");
    return {
      status: document.querySelector("[data-testid=run-status]")?.textContent ?? "",
      count: Number(count?.getAttribute("data-count") ?? -1),
      lastSeq: Number(count?.getAttribute("data-last-seq") ?? -1),
      stream: document.querySelector("[data-testid=stream-state]")?.textContent ?? "",
      reply: document.querySelector("[data-testid=reply]")?.textContent ?? "",
      error: document.querySelector(".error")?.textContent ?? "",
    };
  });
}

async function waitStatus(page, statuses, ms = 60_000) {
  const wanted = [statuses].flat();
  return until(`run status ${wanted.join("|")}`, async () => {
    const view = await runView(page);
    return wanted.includes(view.status) ? view : null;
  }, ms);
}

function screenshot(page, name) {
  if (!env.screenshots) return;
  mkdirSync(env.screenshots, { recursive: true });
  return page.screenshot({ path: join(env.screenshots, name) });
}

describe("the operator UI", { skip: skip ?? false }, () => {
  let browser;
  let stack;
  let grpcPort;
  let uiPort;

  before(async () => {
    grpcPort = await freePort();
    uiPort = await freePort();
    stack = await startDev({ databaseUrl: env.databaseUrl, grpcPort, uiPort, tokenDelayMs: 0 });
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    await stack?.stop();
  });

  test("dev prints the UI address and serves the app under it", async () => {
    assert.equal(stack.ui, `http://127.0.0.1:${uiPort}/`);
    const page = await browser.context.newPage();
    await page.goto(stack.ui);
    await page.getByRole("heading", { name: "Runs" }).waitFor({ timeout: 15_000 });
    const base = await page.evaluate(() => document.querySelector("base")?.getAttribute("href"));
    assert.equal(base, "/");
    await page.close();
  });

  test("a run created from the UI streams its reply to completion", async () => {
    const page = await browser.context.newPage();
    const runId = await createRunFromUi(page, stack.ui, "[tokens:50] hello");
    const view = await waitStatus(page, "completed");
    await until("the whole reply", async () => (await runView(page)).reply.includes("token50"));
    const done = await until("the stream to end", async () => {
      const v = await runView(page);
      return v.stream === "ended" ? v : null;
    });
    assert.ok(done.reply.startsWith("token1 token2"), `reply: ${done.reply.slice(0, 80)}`);
    assert.equal(done.count, done.lastSeq, "every seq held once, none missing");
    assert.ok(done.count > 50, `${done.count} events`);
    // The timeline collapses the 50 deltas into one row.
    const rows = await page.locator(".vlist").getAttribute("data-rows");
    assert.ok(Number(rows) < done.count - 40, `${rows} rows for ${done.count} events`);
    assert.ok(view.status === "completed");
    await screenshot(page, "run.png");
    // A row's raw JSON on click.
    await page.locator(".vlist .event", { hasText: "run.terminal" }).click();
    const raw = await page.locator("[data-testid=raw-json]").textContent();
    assert.match(raw, /"status": "completed"/);
    assert.ok(runId);
    await page.close();
  });

  test("an approval answered in the Approvals page lets the run complete", async () => {
    const page = await browser.context.newPage();
    const runId = await createRunFromUi(page, stack.ui, "[approval]");
    await waitStatus(page, "waiting");
    await page.goto(`${stack.ui}#/approvals`);
    const card = page.locator(`.request[data-run-id="${runId}"]`);
    await card.waitFor({ timeout: 15_000 });
    await card.locator("button[data-decision=accept]").click();
    await card.waitFor({ state: "detached", timeout: 15_000 });
    await page.goto(`${stack.ui}#/runs/${runId}`);
    const view = await waitStatus(page, "completed");
    await until("the reply with the decision", async () => (await runView(page)).reply.includes("Approval: accept"));
    assert.equal(view.status, "completed");
    await page.close();
  });

  test("a running run is cancelled from its page and from the list (bulk)", async () => {
    const page = await browser.context.newPage();
    await createRunFromUi(page, stack.ui, "[stall] one");
    await waitStatus(page, "running");
    await page.locator("[data-testid=cancel-run]").click();
    await waitStatus(page, "cancelled", 30_000);
    // An ended run is run again from its page: the new run's page names the original.
    const original = page.url().split("#/runs/")[1];
    await page.locator("[data-testid=rerun-run]").click();
    await page.locator("[data-testid=rerun-of]", { hasText: original }).waitFor({ timeout: 15_000 });
    assert.notEqual(page.url().split("#/runs/")[1], original);
    await waitStatus(page, "running", 30_000);
    await page.locator("[data-testid=cancel-run]").click();
    await waitStatus(page, "cancelled", 30_000);

    const ids = [];
    for (const name of ["two", "three"]) {
      ids.push(await createRunFromUi(page, stack.ui, `[stall] ${name}`));
      await waitStatus(page, "running");
    }
    await page.goto(`${stack.ui}#/runs?status=running`);
    for (const id of ids) {
      const row = page.locator(`tr[data-run-id="${id}"]`);
      await row.waitFor({ timeout: 15_000 });
      await row.locator("input[type=checkbox]").check();
    }
    await page.locator("[data-testid=bulk-cancel]").click();
    await page.goto(`${stack.ui}#/runs?status=cancelled`);
    for (const id of ids) {
      await page.locator(`tr[data-run-id="${id}"] .badge`, { hasText: "cancelled" }).waitFor({ timeout: 30_000 });
    }
    await page.close();
  });

  test("a run of 20,000 events scrolls to its last seq with few rows in the DOM", async () => {
    const page = await browser.context.newPage();
    const runId = await createRunFromUi(page, stack.ui, "[tokens:20000]");
    const view = await waitStatus(page, "completed", 240_000);
    const done = await until("all events held", async () => {
      const v = await runView(page);
      return v.stream === "ended" && v.count === v.lastSeq && v.count > 20_000 ? v : null;
    }, 120_000);
    assert.equal(view.status, "completed");
    // Collapsed: the deltas are one row.
    assert.ok(Number(await page.locator(".vlist").getAttribute("data-rows")) < 100);

    // Every event a row: 20,000+ rows, a few dozen in the DOM.
    await page.locator("[data-testid=collapse-deltas]").uncheck();
    await page.waitForURL(/deltas=all/, { waitUntil: "commit" });
    await page.goto(`${stack.ui}#/runs/${runId}?deltas=all`);
    await until("the page to load every event again", async () => (await runView(page)).count === done.lastSeq, 120_000);
    const list = page.locator(".vlist");
    assert.equal(Number(await list.getAttribute("data-rows")), done.lastSeq);
    await list.evaluate((el) => {
      el.scrollTop = 0;
    });
    await page.locator('.vlist .event[data-seq="1"]').waitFor({ state: "visible", timeout: 10_000 });
    await list.evaluate((el) => {
      el.scrollTop = el.scrollHeight;
    });
    const last = page.locator(`.vlist .event[data-seq="${done.lastSeq}"]`);
    await last.waitFor({ state: "visible", timeout: 10_000 });
    assert.match(await last.textContent(), /run\.terminal/);
    const domRows = await page.locator(".vlist .vrow").count();
    assert.ok(domRows < 100, `${domRows} rows in the DOM for ${done.lastSeq} events`);
    await page.close();
  });

  test("the runs list with live counts (screenshot), runners and queues pages", async () => {
    const page = await browser.context.newPage();
    // One run still going, so that the live counts show it.
    const stalled = await createRunFromUi(page, stack.ui, "[stall] still going");
    await waitStatus(page, "running");
    await page.goto(`${stack.ui}#/runs`);
    await page.locator(`tr[data-run-id="${stalled}"]`).waitFor({ timeout: 15_000 });
    await page.locator('.chip[data-status="running"] .count', { hasText: /^1$/ }).waitFor({ timeout: 15_000 });
    await screenshot(page, "runs.png");
    await page.goto(`${stack.ui}#/runs/${stalled}`);
    await page.locator("[data-testid=cancel-run]").click();
    await waitStatus(page, "cancelled", 30_000);
    // Filters live in the URL and reach the server (ListRuns' profile filter).
    await page.goto(`${stack.ui}#/runs?profile=no-such-profile`);
    await page.getByText("No runs match.").waitFor({ timeout: 15_000 });
    assert.equal(await page.locator("input[name=profile]").inputValue(), "no-such-profile");
    await page.goto(`${stack.ui}#/runs?profile=scripted&status=cancelled`);
    await until("the cancelled scripted runs", async () => (await page.locator("tr[data-run-id]").count()) >= 4);
    assert.equal(await page.locator("tr[data-run-id] .badge", { hasNotText: "cancelled" }).count(), 0);
    await page.goto(`${stack.ui}#/runners`);
    await until("two runners listed", async () => (await page.locator("tr[data-runner-id]").count()) === 2);
    await page.goto(`${stack.ui}#/queues`);
    await page.getByRole("heading", { name: "Tenants" }).waitFor();
    await page.goto(`${stack.ui}#/sessions`);
    await page.getByRole("heading", { name: "Sessions" }).waitFor();
    await page.close();
  });

  test("a wrong API key shows a clear error (dev --auth, the UI under a base path)", async () => {
    const authed = await startDev({
      databaseUrl: env.authDatabaseUrl,
      grpcPort: await freePort(),
      uiPort: await freePort(),
      auth: true,
      basePath: "/agentrun/",
      runners: 1,
    });
    try {
      assert.match(authed.key, /^ark_/);
      assert.match(authed.adminKey, /^ark_/);
      // Behind an ingress: every asset and gRPC-Web call is relative to the base path.
      assert.match(authed.ui, /^http:\/\/127\.0\.0\.1:\d+\/agentrun\/$/);
      const page = await browser.context.newPage();
      await page.goto(authed.ui);
      // No key: refused, so the login box shows with the server's reason.
      await page.locator("form.login [role=alert]").waitFor({ timeout: 15_000 });
      await page.locator("input[name=api-key]").fill("ark_00000000000000000000000000000000_wrong");
      await page.getByRole("button", { name: "Use this key" }).click();
      const alert = page.locator("form.login [role=alert]");
      await alert.waitFor({ timeout: 15_000 });
      assert.match(await alert.textContent(), /^the API key was refused: \S/);
      // The client key: the runs page; what needs an admin key says so.
      await page.locator("input[name=api-key]").fill(authed.key);
      await page.getByRole("button", { name: "Use this key" }).click();
      await page.getByRole("heading", { name: "Runs" }).waitFor({ timeout: 15_000 });
      await page.getByText("live counts need an admin key").waitFor({ timeout: 15_000 });
      assert.equal(await page.locator("form.login").count(), 0);
      await page.goto(`${authed.ui}#/runners`);
      await page.locator(".error", { hasText: "needs an admin key" }).waitFor({ timeout: 15_000 });
      // With the admin key as well: runners and live counts.
      await page.locator("button.key-button").click();
      await page.locator("input[name=admin-key]").fill(authed.adminKey);
      await page.getByRole("button", { name: "Use this key" }).click();
      await until("the runner listed", async () => (await page.locator("tr[data-runner-id]").count()) === 1);
      await page.goto(`${authed.ui}#/runs`);
      await page.locator(".chip .count").first().waitFor({ timeout: 15_000 });
      await page.close();
    } finally {
      await authed.stop();
    }
  });

  test("the run page resumes across a manager restart, with no seq twice", async () => {
    // Restart the stack with a token delay, so the run streams for a while.
    await stack.stop();
    const restart = () => startDev({ databaseUrl: env.databaseUrl, grpcPort, uiPort, tokenDelayMs: 5 });
    stack = await restart();
    const page = await browser.context.newPage();
    const runId = await createRunFromUi(page, stack.ui, "[tokens:3000]");
    await until("the reply to stream in", async () => {
      const v = await runView(page);
      return v.status === "running" && v.count >= 100 && v.reply.includes("token50") && !v.reply.includes("token3000") ? v : null;
    }, 60_000, 20);

    const stopping = stack.stop();
    await until("the page to notice the manager went away", async () => (await runView(page)).stream.startsWith("reconnecting"), 60_000);
    const how = await stopping;
    assert.ok(how.code === 0 || how.signal === "SIGTERM", `dev stopped: ${JSON.stringify(how)}`);
    stack = await restart();

    const end = await until("the run's end after the restart", async () => {
      const v = await runView(page);
      return v.stream === "ended" && ["completed", "failed"].includes(v.status) ? v : null;
    }, 180_000);
    assert.equal(end.status, "completed");
    assert.equal(end.count, end.lastSeq, "every seq held exactly once");
    assert.ok(end.reply.includes("token3000"));

    // A fresh load of the same run shows the same events and reply.
    const fresh = await browser.context.newPage();
    await fresh.goto(`${stack.ui}#/runs/${runId}`);
    const again = await until("a fresh load", async () => {
      const v = await runView(fresh);
      return v.stream === "ended" ? v : null;
    }, 60_000);
    assert.equal(again.lastSeq, end.lastSeq);
    assert.equal(again.reply, end.reply);
    await fresh.close();
    await page.close();
  });

  test("no page broke the manager's Content-Security-Policy", () => {
    assert.deepEqual(browser.cspViolations, []);
  });
});
