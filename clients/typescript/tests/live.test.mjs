// The SDK against a live `agentrun dev` (see helpers.mjs): runs end to end over gRPC and
// gRPC-Web, watches that survive cuts and a manager restart, typed errors, pagination.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  AgentrunError,
  Canceled,
  Client,
  Code,
  CommandKind,
  DeadlineExceeded,
  FailedPrecondition,
  InvalidArgument,
  NotFound,
  RunStatus,
  grpcWebTransport,
} from "@agentrun/client";
import {
  RUN_DEADLINE_MS,
  TcpProxy,
  assertGapless,
  client,
  collect,
  env,
  freshTenant,
  replyText,
  stored,
  waitUntil,
} from "./helpers.mjs";

// A run that streams for a few seconds (the script sets the per-token delay), so a cut
// lands mid-run.
const LONG_PROMPT = "[tokens:120] stream for a while";
const TOKENS = Array.from({ length: 120 }, (_, i) => `token${i + 1}`);

/** create → watch → approve → complete, asserted step by step; shared by both transports. */
async function approveToCompletion(c) {
  const run = await c.createRun("scripted", { prompt: "[approval] deploy the site" });
  assert.ok(run.runId);
  assert.equal(run.backendProfile, "scripted");
  const events = [];
  const answered = [];
  for await (const event of c.watchRun(run.runId, { deadlineMs: RUN_DEADLINE_MS })) {
    events.push(event);
    if (event.type === "request.opened") {
      const requestId = event.payload.request_id;
      // The approvals inbox shows it, open, before anyone answers.
      const open = await collect(c.listRequests({ runId: run.runId }));
      assert.deepEqual(open.map((r) => r.requestId), [requestId]);
      assert.equal(RunStatus[(await c.getRun(run.runId)).status], "WAITING");
      const resolved = await c.resolve(run.runId, requestId, "accept");
      assert.ok(resolved.resolvedNow);
      assert.equal(resolved.request?.status, "resolved");
      answered.push(requestId);
      // Answering twice returns the first answer, not an error.
      const again = await c.resolve(run.runId, requestId, "decline");
      assert.ok(!again.resolvedNow);
      assert.match(again.resolutionJson, /"accept"/);
    }
  }
  assert.equal(answered.length, 1, "no request.opened event");
  const last = events.at(-1);
  assert.equal(last.type, "run.terminal");
  assert.equal(last.payload.status, "completed");
  assertGapless(stored(events));
  assert.match(replyText(events), /Approval: accept/);
  assert.ok(last.createdAt instanceof Date && typeof last.raw.seq === "bigint");
  const final = await c.getRun(run.runId);
  assert.equal(final.status, RunStatus.COMPLETED);
  assert.equal(Number(final.lastEventSeq), last.seq);
  assert.deepEqual(await collect(c.listRequests({ runId: run.runId })), []);
  const resolvedRequests = await collect(c.listRequests({ runId: run.runId, statuses: ["resolved"] }));
  assert.deepEqual(resolvedRequests.map((r) => r.requestId), answered);
  // The stored log, read by pages, is the watch's stored events.
  assert.deepEqual((await collect(c.listEvents(run.runId, { limit: 3 }))).map((e) => e.seq), stored(events));
  return events;
}

test("create → watch → approve → complete (gRPC)", async () => {
  await approveToCompletion(client());
});

test("create → watch → approve → complete through gRPC-Web on the UI port (what a browser uses)", async () => {
  const tenant = freshTenant();
  const web = new Client({ transport: grpcWebTransport(env("AGENTRUN_UI_URL")), tenant });
  await approveToCompletion(web);
  // The same tenant over gRPC sees the run gRPC-Web created; errors are typed the same way.
  const runs = await collect(client(tenant).listRuns());
  assert.equal(runs.length, 1);
  await assert.rejects(web.getRun(randomUUID()), NotFound);
});

test("watch resumes after the connection is cut mid-run, gapless, no seq twice", async () => {
  const tenant = freshTenant();
  const proxy = await new TcpProxy(env("AGENTRUN_MANAGER_URL")).start();
  try {
    const direct = client(tenant);
    const viaProxy = client(tenant, proxy.url);
    const run = await direct.createRun("scripted", { prompt: LONG_PROMPT });
    const events = [];
    const cutAt = [];
    const reconnects = [];
    // With the last seq yielded when the stream broke: messages that arrived before the
    // cut are still yielded after it, so a resume may start past the cut's event.
    const onReconnect = (info) => reconnects.push({ ...info, lastYielded: events.at(-1)?.seq });
    for await (const event of viaProxy.watchRun(run.runId, { deadlineMs: RUN_DEADLINE_MS, maxBackoffMs: 500, onReconnect })) {
      events.push(event);
      const deltas = events.filter((e) => e.type === "content.delta").length;
      // Cut twice mid-stream, each time while the run is still going.
      if ((deltas === 5 && cutAt.length === 0) || (deltas === 40 && cutAt.length === 1)) {
        assert.notEqual((await direct.getRun(run.runId)).status, RunStatus.COMPLETED);
        proxy.cut();
        cutAt.push(event.seq);
      }
    }
    assert.equal(cutAt.length, 2, `the run ended before both cuts: ${cutAt}`);
    assert.ok(proxy.accepted >= 3, `the watch did not reconnect after each cut (${proxy.accepted} connections)`);
    // Each cut was seen as a broken stream and resumed from the last seq yielded.
    assert.ok(reconnects.length >= 2, `reconnects: ${JSON.stringify(reconnects)}`);
    reconnects.slice(0, 2).forEach((r, i) => {
      assert.equal(r.afterSeq, r.lastYielded, `reconnects: ${JSON.stringify(reconnects)}`);
      assert.ok(r.afterSeq >= cutAt[i] && (i === 1 || r.afterSeq < cutAt[1]), `reconnects: ${JSON.stringify(reconnects)}, cuts at ${cutAt}`);
    });
    assert.ok(reconnects.every((r) => r.delayMs <= 500));
    if (process.env.TEST_LOG) console.log("reconnects", reconnects.map((r) => `${r.error?.codeName}: ${r.error?.message}`));
    assert.equal(events.at(-1).type, "run.terminal");
    assertGapless(stored(events));
    assert.ok(events.at(-1).seq > cutAt[1]);
    assert.deepEqual(replyText(events).split(/\s+/).filter(Boolean), TOKENS);
    assert.equal(Number((await direct.getRun(run.runId)).lastEventSeq), events.at(-1).seq);
  } finally {
    await proxy.close();
  }
});

test("a gRPC-Web watch (UI port) resumes after the connection is cut mid-run", async () => {
  const tenant = freshTenant();
  const proxy = await new TcpProxy(env("AGENTRUN_UI_URL")).start();
  try {
    const direct = client(tenant);
    const web = new Client({ transport: grpcWebTransport(proxy.url), tenant });
    const run = await direct.createRun("scripted", { prompt: LONG_PROMPT });
    const events = [];
    const reconnects = [];
    let cutAt = 0;
    // With the last seq yielded when the stream broke: messages that arrived before the
    // cut are still yielded after it, so a resume may start past the cut's event.
    const onReconnect = (info) => reconnects.push({ ...info, lastYielded: events.at(-1)?.seq });
    const options = { deadlineMs: RUN_DEADLINE_MS, maxBackoffMs: 500, onReconnect };
    for await (const event of web.watchRun(run.runId, options)) {
      events.push(event);
      if (!cutAt && events.filter((e) => e.type === "content.delta").length === 10) {
        assert.notEqual((await direct.getRun(run.runId)).status, RunStatus.COMPLETED);
        proxy.cut();
        cutAt = event.seq;
      }
    }
    assert.ok(cutAt, "the run ended before the cut");
    if (process.env.TEST_LOG) console.log("reconnects", reconnects.map((r) => `${r.error?.codeName}: ${r.error?.message}`));
    assert.ok(reconnects.length >= 1, `reconnects: ${JSON.stringify(reconnects)}`);
    assert.equal(reconnects[0].afterSeq, reconnects[0].lastYielded, `reconnects: ${JSON.stringify(reconnects)}`);
    assert.ok(reconnects[0].afterSeq >= cutAt, `reconnects: ${JSON.stringify(reconnects)}, cut at ${cutAt}`);
    assert.equal(events.at(-1).type, "run.terminal");
    assertGapless(stored(events));
    assert.deepEqual(replyText(events).split(/\s+/).filter(Boolean), TOKENS);
  } finally {
    await proxy.close();
  }
});

test("watch resumes across a manager restart (same database and port)", async () => {
  const pidfile = env("AGENTRUN_TEST_DEV_PIDFILE");
  const devPid = () => Number(readFileSync(pidfile, "utf8").trim() || 0);
  const alive = (pid) => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  const c = client();
  const run = await c.createRun("scripted", { prompt: LONG_PROMPT });
  const events = [];
  let killed = 0;
  const reconnects = [];
  const onReconnect = (info) => reconnects.push(info);
  for await (const event of c.watchRun(run.runId, { deadlineMs: RUN_DEADLINE_MS, maxBackoffMs: 1000, onReconnect })) {
    events.push(event);
    if (!killed && events.filter((e) => e.type === "content.delta").length === 5) {
      killed = devPid();
      assert.ok(killed && alive(killed));
      // The whole stack goes: runners drain (the run is released back to the queue after
      // the short drain grace the script sets), then the manager; the script restarts it.
      process.kill(killed, "SIGTERM");
    }
  }
  assert.ok(killed, "the run ended before the manager could be killed");
  assert.ok(!alive(killed), "the terminal event came from the manager that was told to stop");
  assert.notEqual(devPid(), killed);
  assert.equal(events.at(-1).type, "run.terminal");
  assert.equal(events.at(-1).payload.status, "completed");
  assertGapless(stored(events));
  const kinds = events.map((e) => e.type);
  assert.ok(kinds.includes("run.requeued"), `the run was not interrupted by the restart: ${kinds}`);
  assert.ok(reconnects.length >= 1, "the watch never reconnected");
  if (process.env.TEST_LOG) console.log("reconnects", reconnects.map((r) => `${r.error?.codeName}: ${r.error?.message}`));
  assert.equal(Number((await c.getRun(run.runId)).lastEventSeq), events.at(-1).seq);
});

test("another tenant's run is NotFound, like an unknown id", async () => {
  const mine = client();
  const run = await mine.createRun("scripted", { prompt: "hello" }, { queue: `unserved-${randomUUID().slice(0, 8)}` });
  const other = client(`other-${randomUUID().slice(0, 8)}`);
  const theirs = await other.getRun(run.runId).then(() => assert.fail("getRun of another tenant's run succeeded"), (e) => e);
  const unknownId = randomUUID();
  const unknown = await other.getRun(unknownId).then(() => assert.fail("getRun of an unknown id succeeded"), (e) => e);
  for (const error of [theirs, unknown]) {
    assert.ok(error instanceof NotFound && error instanceof AgentrunError, String(error));
    assert.equal(error.code, Code.NotFound);
  }
  assert.equal(theirs.reason, unknown.reason);
  assert.equal(theirs.message.replaceAll(run.runId, "ID"), unknown.message.replaceAll(unknownId, "ID"));
  await assert.rejects(other.cancel(run.runId), NotFound);
  await assert.rejects(collect(other.listRequests({ runId: run.runId })), NotFound);
  await assert.rejects(collect(other.watchRun(run.runId, { deadlineMs: 10_000 })), NotFound);
  assert.equal((await mine.cancel(run.runId)).runId, run.runId);
});

test("InvalidArgument names the field", async () => {
  const c = client();
  const badPriority = await c.createRun("scripted", { prompt: "x" }, { priority: 5000 }).then(
    () => assert.fail("priority 5000 was accepted"),
    (e) => e,
  );
  assert.ok(badPriority instanceof InvalidArgument, String(badPriority));
  assert.equal(badPriority.code, Code.InvalidArgument);
  assert.match(badPriority.message, /priority/);
  await assert.rejects(c.getRun("not-a-uuid"), (e) => e instanceof InvalidArgument && /run_id/.test(e.message));
});

test("FailedPrecondition carries the agentrun-error reason", async () => {
  const c = client();
  const run = await c.createRun("scripted", { prompt: "[tokens:2]" });
  await collect(c.watchRun(run.runId, { deadlineMs: RUN_DEADLINE_MS }));
  const error = await c.cancel(run.runId, "too late").then(() => assert.fail("cancel of a finished run succeeded"), (e) => e);
  assert.ok(error instanceof FailedPrecondition, String(error));
  assert.equal(error.reason, "run_terminal");
});

test("listRuns walks every page; send and cancel", async () => {
  const c = client();
  const queue = `unserved-${randomUUID().slice(0, 8)}`; // no runner serves it: the runs stay pending
  const created = [];
  for (let i = 0; i < 5; i++) created.push((await c.createRun("scripted", { prompt: `p${i}` }, { queue })).runId);
  const listed = (await collect(c.listRuns({ queue, pageSize: 2 }))).map((r) => r.runId);
  assert.deepEqual(listed, [...created].reverse(), "newest first, all three pages");
  assert.deepEqual((await collect(c.listRuns({ queue, statuses: ["pending"], pageSize: 500 }))).map((r) => r.runId), listed);
  assert.deepEqual(await collect(c.listRuns({ queue, statuses: ["completed"] })), []);
  const command = await c.send(created[0], "turn", { text: "and then this", deliveryPolicy: "queue" });
  assert.equal(command.kind, CommandKind.TURN);
  assert.equal(command.runId, created[0]);
  for (const runId of created) assert.equal((await c.cancel(runId, "test")).status, RunStatus.CANCELLED);
  assert.equal((await collect(c.listRuns({ queue, statuses: [RunStatus.CANCELLED], pageSize: 1 }))).length, 5);
});

test("final-mode live deltas are yielded without moving the cursor", async () => {
  const c = client();
  const run = await c.createRun("scripted", { prompt: "[tokens:30]" }, { streamMode: "final" });
  const events = await collect(c.watchRun(run.runId, { deadlineMs: RUN_DEADLINE_MS }));
  assertGapless(stored(events));
  assert.ok(events.filter((e) => e.ephemeral).every((e) => e.type === "content.delta"));
  const completed = events.filter((e) => e.type === "item.completed" && e.payload.kind === "assistant_message");
  assert.deepEqual(completed.at(-1).payload.text.split(/\s+/), TOKENS.slice(0, 30));
  assert.ok(!events.some((e) => e.type === "content.delta" && !e.ephemeral));
});

test("a watch resumes from afterSeq, stops on abort, and reports its deadline", async () => {
  const c = client();
  const run = await c.createRun("scripted", { prompt: "[stall] wait here" });
  // The watch of a stalled run reaches its first events, then waits.
  const seen = [];
  const controller = new AbortController();
  const aborted = (async () => {
    for await (const event of c.watchRun(run.runId, { signal: controller.signal })) seen.push(event);
  })();
  await waitUntil(() => seen.length >= 2, RUN_DEADLINE_MS, "the first events of the stalled run");
  controller.abort();
  await assert.rejects(aborted, Canceled);
  // Resuming after the first event yields the rest, from seq 2.
  const later = [];
  const expired = await (async () => {
    for await (const event of c.watchRun(run.runId, { afterSeq: 1, deadlineMs: 1500 })) later.push(event);
  })().then(() => assert.fail("the watch of a stalled run ended"), (e) => e);
  assert.ok(expired instanceof DeadlineExceeded, String(expired));
  assert.equal(later[0].seq, 2);
  assertGapless(stored(later), 2);
  await c.cancel(run.runId, "test over");
});

test("a watch without deadlineMs outlives the client's unary timeoutMs", async () => {
  const c = new Client({ url: env("AGENTRUN_MANAGER_URL"), tenant: freshTenant(), timeoutMs: 300 });
  const run = await c.createRun("scripted", { prompt: "[tokens:60]" }); // about 1.2 s of streaming
  const reconnects = [];
  const started = Date.now();
  const events = await collect(c.watchRun(run.runId, { onReconnect: (info) => reconnects.push(info) }));
  assert.ok(Date.now() - started > 300, "the run was too short to prove anything");
  assert.equal(events.at(-1).type, "run.terminal");
  assertGapless(stored(events));
  assert.deepEqual(reconnects, [], "the watch was cut by the unary timeout and had to reconnect");
});
