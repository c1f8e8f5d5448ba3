// The Node entry: `new Client({ url: "http://host:port" })` speaks gRPC over HTTP/2 to the
// manager's API port (@connectrpc/connect-node). Bundlers targeting browsers pick
// browser.ts instead (the "browser" export condition).
import { createGrpcTransport } from "@connectrpc/connect-node";
import type { Transport } from "@connectrpc/connect";

import { Client as BaseClient, type ClientOptions } from "./client.js";

export * from "./shared.js";

/**
 * gRPC over HTTP/2 to `http://host:port` (plaintext, h2c) or `https://host:port`, with
 * HTTP/2 pings so a silently dead connection under a watch is noticed and resumed.
 */
export function grpcTransport(url: string): Transport {
  return createGrpcTransport({
    baseUrl: normalizeUrl(url),
    pingIntervalMs: 30_000,
    pingTimeoutMs: 10_000,
  });
}

/** A connection to an agentrun manager (Node: gRPC unless `transport` says otherwise). */
export class Client extends BaseClient {
  constructor(options: ClientOptions) {
    super(options, grpcTransport);
  }

  /**
   * A client configured like the `agentrun` CLI: AGENTRUN_MANAGER_URL (default
   * http://127.0.0.1:7400), AGENTRUN_API_KEY, AGENTRUN_TENANT; `options` override them.
   */
  static fromEnv(options: ClientOptions = {}): Client {
    const env = process.env;
    return new Client({
      url: env["AGENTRUN_MANAGER_URL"] || "http://127.0.0.1:7400",
      apiKey: env["AGENTRUN_API_KEY"] || undefined,
      tenant: env["AGENTRUN_TENANT"] || undefined,
      ...options,
    });
  }
}

/** `host:port` gets http://; a trailing slash goes. */
function normalizeUrl(url: string): string {
  const text = url.trim().replace(/\/+$/, "");
  if (!text) throw new TypeError("url is empty: expected http://host:port or https://host:port");
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(text) ? text : `http://${text}`;
}
