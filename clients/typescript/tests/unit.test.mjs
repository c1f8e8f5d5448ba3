// The SDK's pure pieces, without a server: error mapping, the watch's cursor and backoff,
// which failures a watch resumes after, enum names, the client's options.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  AgentrunError,
  Backoff,
  Client,
  Code,
  ConnectError,
  Cursor,
  FailedPrecondition,
  NotFound,
  RunStatus,
  StreamMode,
  Unavailable,
  enumValue,
  isTransient,
  toAgentrunError,
} from "@agentrun/client";

test("a ConnectError becomes the subclass for its code, with the agentrun-error reason", () => {
  const trailer = new ConnectError("run is over", Code.FailedPrecondition, new Headers({ "agentrun-error": "run_terminal" }));
  const error = toAgentrunError(trailer);
  assert.ok(error instanceof FailedPrecondition && error instanceof AgentrunError && error instanceof Error);
  assert.equal(error.code, Code.FailedPrecondition);
  assert.equal(error.codeName, "FailedPrecondition");
  assert.equal(error.reason, "run_terminal");
  assert.equal(error.message, "run is over");
  assert.equal(error.name, "FailedPrecondition");
  assert.equal(String(error), "FailedPrecondition [FailedPrecondition]: run is over (reason: run_terminal)");
  const plain = toAgentrunError(new ConnectError("no such run", Code.NotFound));
  assert.ok(plain instanceof NotFound);
  assert.equal(plain.reason, undefined);
  assert.equal(toAgentrunError(plain), plain);
  // Anything else is Unknown, still an AgentrunError.
  assert.equal(toAgentrunError(new Error("boom")).code, Code.Unknown);
});

test("the cursor drops replays and lets ephemeral events through without moving", () => {
  const cursor = new Cursor(3n);
  assert.equal(cursor.admit({ seq: 2n, ephemeral: false }), false);
  assert.equal(cursor.admit({ seq: 3n, ephemeral: false }), false);
  assert.equal(cursor.admit({ seq: 4n, ephemeral: false }), true);
  assert.equal(cursor.admit({ seq: 4n, ephemeral: true }), true);
  assert.equal(cursor.seq, 4n);
  assert.equal(cursor.admit({ seq: 4n, ephemeral: false }), false);
});

test("backoff doubles with jitter up to its cap, and resets", () => {
  const backoff = new Backoff(100, 1000);
  const delays = Array.from({ length: 8 }, () => backoff.nextDelay());
  delays.forEach((d, i) => {
    const nominal = Math.min(1000, 100 * 2 ** i);
    assert.ok(d >= nominal / 2 && d <= nominal, `delay ${i}: ${d} outside [${nominal / 2}, ${nominal}]`);
  });
  backoff.reset();
  assert.ok(backoff.nextDelay() <= 100);
});

test("a watch resumes after UNAVAILABLE and connection resets, not after NotFound", () => {
  assert.ok(isTransient(new Unavailable(Code.Unavailable, "connection refused")));
  assert.ok(isTransient(new AgentrunError(Code.Internal, "stream closed with RST_STREAM")));
  assert.ok(isTransient(new AgentrunError(Code.Unknown, "terminated")));
  assert.ok(!isTransient(new AgentrunError(Code.Internal, "the database said no")));
  assert.ok(!isTransient(new NotFound(Code.NotFound, "run not found")));
});

test("enums by short name, full name or value; unknown names list the known ones", () => {
  assert.equal(enumValue(RunStatus, "completed", "statuses"), RunStatus.COMPLETED);
  assert.equal(enumValue(RunStatus, "RUN_STATUS_WAITING", "statuses"), RunStatus.WAITING);
  assert.equal(enumValue(StreamMode, StreamMode.FINAL, "streamMode"), StreamMode.FINAL);
  assert.throws(() => enumValue(StreamMode, "fast", "streamMode"), /streamMode: "fast" is not one of deltas, coalesced, final/);
  assert.throws(() => enumValue(RunStatus, 99, "statuses"), RangeError);
});

test("the client needs a url or a transport, and checks its inputs before calling", async () => {
  assert.throws(() => new Client({}), TypeError);
  const c = new Client({ url: "127.0.0.1:1", tenant: "t", apiKey: "k" });
  const headers = new Headers(c.callOptions().headers);
  assert.equal(headers.get("authorization"), "Bearer k");
  assert.equal(headers.get("agentrun-tenant"), "t");
  await assert.rejects(c.createRun("scripted", ["not", "an", "object"]), TypeError);
  await assert.rejects(c.send("id", "interrupt", { text: "x" }), TypeError);
  // Nothing listens on port 1: a typed Unavailable, not a raw transport error.
  await assert.rejects(c.getRun("00000000-0000-0000-0000-000000000000"), Unavailable);
});

test("the browser entry reaches no Node module (what a bundler would pull in)", async () => {
  const { readFileSync } = await import("node:fs");
  const { fileURLToPath } = await import("node:url");
  const { dirname, join } = await import("node:path");
  const entry = fileURLToPath(import.meta.resolve("@agentrun/client/web"));
  const seen = new Set();
  const bare = new Set();
  const visit = (file) => {
    if (seen.has(file)) return;
    seen.add(file);
    const text = readFileSync(file, "utf8");
    for (const [, spec] of text.matchAll(/(?:import|export)[^"']*?from\s*["']([^"']+)["']/g)) {
      if (spec.startsWith(".")) visit(join(dirname(file), spec));
      else bare.add(spec);
    }
  };
  visit(entry);
  assert.ok(seen.size >= 4, `followed only ${[...seen]}`);
  const nodeOnly = [...bare].filter((spec) => spec.startsWith("node:") || spec.includes("connect-node"));
  assert.deepEqual(nodeOnly, [], `the browser entry imports ${nodeOnly}`);
  assert.ok(bare.has("@connectrpc/connect-web"));
  const web = await import("@agentrun/client/web");
  assert.equal(typeof web.Client, "function");
  assert.equal(typeof web.grpcWebTransport, "function");
  assert.equal(web.grpcTransport, undefined);
});
