// What both entries (Node and browser) export: the client, errors, event helpers and the
// generated messages and enums the verbs return.
export {
  Backoff,
  Client as BaseClient,
  Cursor,
  TERMINAL_EVENT,
  USER_AGENT,
  enumValue,
  eventFromMessage,
  isTransient,
  type ClientOptions,
  type CommandKindName,
  type CreateRunOptions,
  type DeliveryPolicyName,
  type Event,
  type ListEventsOptions,
  type ListRequestsOptions,
  type ListRunsFilters,
  type ResolveOptions,
  type RunStatusName,
  type SendOptions,
  type StreamModeName,
  type WatchOptions,
} from "./client.js";
export * from "./errors.js";
export { Code, ConnectError, type Transport } from "@connectrpc/connect";
export {
  CommandKind,
  CommandStatus,
  Producer,
  RunStatus,
  StreamMode,
  TurnDeliveryPolicy,
  type Command,
  type Event as EventMessage,
  type Request,
  type Run,
} from "./gen/agentrun/v1/types_pb.js";
export { RunService, type ResolveRequestResponse } from "./gen/agentrun/v1/run_service_pb.js";

import { createGrpcWebTransport } from "@connectrpc/connect-web";
import type { Transport } from "@connectrpc/connect";

/**
 * A gRPC-Web transport to the manager's UI port (its origin plus any --ui-base-path,
 * e.g. `http://127.0.0.1:7401` or `document.baseURI`): what a browser uses, since
 * browsers cannot speak gRPC over HTTP/2 themselves.
 */
export function grpcWebTransport(baseUrl: string): Transport {
  return createGrpcWebTransport({ baseUrl: baseUrl.replace(/\/+$/, "") });
}
