// API keys against `agentrun dev --auth` (started by the script; its banner's keys).
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";

import { Client, Code, PermissionDenied, Unauthenticated } from "@agentrun/client";
import { collect, env } from "./helpers.mjs";

const url = () => env("AGENTRUN_TEST_AUTH_URL");

test("a client key works (authorization: Bearer) and the tenant header is then ignored", async () => {
  const key = env("AGENTRUN_TEST_API_KEY");
  const c = new Client({ url: url(), apiKey: key });
  const run = await c.createRun("scripted", { prompt: "hello" }, { queue: `unserved-${randomUUID().slice(0, 8)}` });
  assert.equal((await c.getRun(run.runId)).runId, run.runId);
  // With keys checked the tenant is the key's: the header cannot switch tenants.
  const sameTenant = new Client({ url: url(), apiKey: key, tenant: "someone-else" });
  assert.equal((await sameTenant.getRun(run.runId)).runId, run.runId);
  await sameTenant.cancel(run.runId);
});

test("a missing or wrong key is Unauthenticated", async () => {
  for (const apiKey of [undefined, "ar_not_a_real_key"]) {
    const c = new Client({ url: url(), apiKey });
    await assert.rejects(c.getRun(randomUUID()), (e) => e instanceof Unauthenticated && e.code === Code.Unauthenticated);
  }
});

test("an admin key may not use RunService: PermissionDenied", async () => {
  const admin = new Client({ url: url(), apiKey: env("AGENTRUN_TEST_ADMIN_KEY") });
  await assert.rejects(collect(admin.listRuns()), (e) => e instanceof PermissionDenied && /key/.test(e.message));
});
