// The run page's event model (src/timeline.ts), bundled by esbuild for node: each seq is
// held once whatever is resent, consecutive deltas collapse into one row, and requeues
// and new lease epochs are marked.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

import { build } from "esbuild";

const web = join(dirname(fileURLToPath(import.meta.url)), "..");
let dir;
let Timeline;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "agentrun-web-unit-"));
  const outfile = join(dir, "timeline.mjs");
  await build({ entryPoints: [join(web, "src", "timeline.ts")], bundle: true, format: "esm", platform: "node", outfile, logLevel: "error" });
  ({ Timeline } = await import(pathToFileURL(outfile)));
});
after(() => rmSync(dir, { recursive: true, force: true }));

function ev(seq, type, payload = {}, extra = {}) {
  return { seq: BigInt(seq), type, payloadJson: JSON.stringify(payload), runnerId: "", epoch: 0n, ephemeral: false, ...extra };
}

const delta = (seq, text, item = "i1", epoch = 1n) =>
  ev(seq, "content.delta", { item_id: item, kind: "assistant_text", delta: text }, { epoch, runnerId: "r1" });

test("a resent seq is dropped, so nothing shows twice", () => {
  const tl = new Timeline();
  for (const e of [ev(1, "run.created"), ev(2, "turn.started"), delta(3, "a"), delta(4, "b")]) assert.ok(tl.add(e));
  // A reconnect resends from an older seq.
  assert.equal(tl.add(delta(3, "a")), false);
  assert.equal(tl.add(delta(4, "b")), false);
  assert.ok(tl.add(delta(5, "c")));
  assert.equal(tl.events.length, 5);
  assert.equal(tl.duplicates, 2);
  assert.equal(tl.lastSeq, 5n);
  assert.equal(tl.reply(), "abc");
});

test("consecutive deltas of one item collapse into one row; other events break them", () => {
  const tl = new Timeline();
  tl.add(ev(1, "run.created"));
  tl.add(ev(2, "turn.started"));
  for (let s = 3; s < 1003; s++) tl.add(delta(s, "x"));
  tl.add(ev(1003, "item.completed", { item_id: "i1", kind: "assistant_message", text: "done" }));
  tl.add(delta(1004, "y", "i2"));
  tl.add(delta(1005, "z", "i3"));
  assert.equal(tl.rows.length, 6);
  const deltas = tl.rows[2];
  assert.equal(deltas.last - deltas.first + 1, 1000);
  assert.equal(deltas.turn, 1);
  assert.equal(tl.reply(), "done\n\ny\n\nz");
  assert.equal(tl.firstTokenMs, undefined); // the test events carry no time
});

test("requeues and a new lease epoch are marked", () => {
  const tl = new Timeline();
  tl.add(delta(1, "a", "i1", 1n));
  tl.add(ev(2, "run.requeued", { reason: "lease_expired" }));
  tl.add(delta(3, "b", "i2", 2n));
  assert.deepEqual(
    tl.rows.map((r) => r.mark),
    [undefined, "requeued", "new lease (epoch 2)"],
  );
});

test("ephemeral deltas reach the reply but not the log", () => {
  const tl = new Timeline();
  tl.add(ev(1, "turn.started"));
  tl.add({ ...delta(1, "live"), ephemeral: true });
  assert.equal(tl.events.length, 1);
  assert.equal(tl.reply(), "live");
  tl.add(ev(2, "item.completed", { item_id: "i1", kind: "assistant_message", text: "live!" }));
  assert.equal(tl.reply(), "live!");
});

test("open requests come and go with request.opened / request.resolved", () => {
  const tl = new Timeline();
  tl.add(ev(1, "request.opened", { request_id: "q1", kind: "command" }));
  assert.deepEqual([...tl.openRequests.keys()], ["q1"]);
  tl.add(ev(2, "request.resolved", { request_id: "q1", decision: "accept" }));
  assert.equal(tl.openRequests.size, 0);
});
