// Shared helpers for the SDK's tests against a live `agentrun dev`.
//
// scripts/typescript-client-test.sh starts the stack and sets:
//   AGENTRUN_MANAGER_URL        the dev manager's gRPC address (auth disabled: tenants by header)
//   AGENTRUN_UI_URL             its UI port, which serves gRPC-Web (what browsers use)
//   AGENTRUN_TEST_DEV_PIDFILE   the file holding the current `agentrun dev` pid; the script
//                               restarts dev (same DATABASE_URL and ports) whenever that
//                               process exits, so a test can kill it to lose the manager.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import net from "node:net";

import { Client } from "@agentrun/client";

/** How long one run (of the tests' scripted prompts) may take end to end. */
export const RUN_DEADLINE_MS = 90_000;

export function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run scripts/typescript-client-test.sh`);
  return value;
}

/** A fresh tenant per test (dev runs without auth, so the header picks it). */
export function freshTenant() {
  return `ts-${randomUUID().slice(0, 12)}`;
}

export function client(tenant = freshTenant(), url = env("AGENTRUN_MANAGER_URL")) {
  return new Client({ url, tenant });
}

/** Polls `check` until it returns something truthy; fails after `timeoutMs`. */
export async function waitUntil(check, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Stored seqs strictly increasing by one from `first`. */
export function assertGapless(seqs, first = 1) {
  assert.ok(seqs.length > 0, "no stored events");
  assert.deepEqual(seqs, Array.from({ length: seqs.length }, (_, i) => first + i), `seqs not gapless: ${seqs}`);
}

export function stored(events) {
  return events.filter((e) => !e.ephemeral).map((e) => e.seq);
}

export function replyText(events) {
  return events
    .filter((e) => e.type === "content.delta" && e.payload.kind === "assistant_text")
    .map((e) => e.payload.delta ?? "")
    .join("");
}

export async function collect(iterable) {
  const items = [];
  for await (const item of iterable) items.push(item);
  return items;
}

/**
 * A loopback TCP relay in front of the manager whose connections the test can cut
 * (`cut`: a TCP reset of every live connection), as a network or load balancer would.
 */
export class TcpProxy {
  constructor(upstream) {
    const url = new URL(upstream);
    this.upstream = { host: url.hostname, port: Number(url.port) };
    this.accepted = 0;
    this.sockets = new Set();
    this.server = net.createServer((downstream) => {
      this.accepted += 1;
      const up = net.connect(this.upstream);
      for (const [a, b] of [[downstream, up], [up, downstream]]) {
        this.sockets.add(a);
        a.pipe(b);
        a.on("error", () => b.destroy());
        a.on("close", () => {
          this.sockets.delete(a);
          b.destroy();
        });
      }
    });
  }

  async start() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    return this;
  }

  get url() {
    return `http://127.0.0.1:${this.server.address().port}`;
  }

  /** Resets every live connection; new ones are still accepted. */
  cut() {
    for (const socket of this.sockets) socket.resetAndDestroy();
    this.sockets.clear();
  }

  async close() {
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }
}
