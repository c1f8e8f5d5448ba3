// Errors: every failed call rejects with an `AgentrunError` carrying the Connect/gRPC
// code, the server's message and the machine-readable reason the manager sends in the
// `agentrun-error` response metadata (a header or a trailer).
import { Code, ConnectError } from "@connectrpc/connect";

/** Response metadata key carrying a machine-readable reason (e.g. `run_terminal`). */
export const REASON_METADATA_KEY = "agentrun-error";

/** A call to the manager failed. `instanceof` one of the subclasses to tell them apart. */
export class AgentrunError extends Error {
  /** The Connect/gRPC status code (`Code.NotFound` = 5, ...). */
  readonly code: Code;
  /**
   * The `agentrun-error` response metadata (`run_terminal`, `illegal_transition`,
   * `turn_not_active`, `idempotency_conflict`, `lease_lost`, ...), or undefined when the
   * server sent none.
   */
  readonly reason: string | undefined;
  /** The error as Connect reported it (its `metadata` holds every header and trailer). */
  readonly cause: ConnectError | undefined;

  constructor(code: Code, message: string, reason?: string, cause?: ConnectError) {
    super(message);
    this.code = code;
    this.reason = reason || undefined;
    this.cause = cause;
    this.name = new.target.name;
  }

  /** The code's name as Connect spells it: "NotFound", "InvalidArgument", ... */
  get codeName(): string {
    return Code[this.code] ?? String(this.code);
  }

  override toString(): string {
    const reason = this.reason ? ` (reason: ${this.reason})` : "";
    return `${this.name} [${this.codeName}]: ${this.message}${reason}`;
  }
}

/** NOT_FOUND: no such object for the caller's tenant (another tenant's id included). */
export class NotFound extends AgentrunError {}
/** INVALID_ARGUMENT: a request field is wrong; the message names it. */
export class InvalidArgument extends AgentrunError {}
/** FAILED_PRECONDITION: not allowed in the object's current state (see `reason`). */
export class FailedPrecondition extends AgentrunError {}
/** ALREADY_EXISTS: an idempotency key was reused with a different request. */
export class AlreadyExists extends AgentrunError {}
/** UNAUTHENTICATED: no API key, or an unknown or revoked one. */
export class Unauthenticated extends AgentrunError {}
/** PERMISSION_DENIED: the key's role may not call this service. */
export class PermissionDenied extends AgentrunError {}
/** RESOURCE_EXHAUSTED: a tenant limit or quota was reached. */
export class ResourceExhausted extends AgentrunError {}
/** UNAVAILABLE: the manager cannot be reached (or is shutting down). */
export class Unavailable extends AgentrunError {}
/** DEADLINE_EXCEEDED: the call (or a watch's overall `deadlineMs`) ran out of time. */
export class DeadlineExceeded extends AgentrunError {}
/** CANCELED: the caller aborted (an `AbortSignal`). */
export class Canceled extends AgentrunError {}

const BY_CODE: Partial<Record<Code, new (code: Code, message: string, reason?: string, cause?: ConnectError) => AgentrunError>> = {
  [Code.NotFound]: NotFound,
  [Code.InvalidArgument]: InvalidArgument,
  [Code.FailedPrecondition]: FailedPrecondition,
  [Code.AlreadyExists]: AlreadyExists,
  [Code.Unauthenticated]: Unauthenticated,
  [Code.PermissionDenied]: PermissionDenied,
  [Code.ResourceExhausted]: ResourceExhausted,
  [Code.Unavailable]: Unavailable,
  [Code.DeadlineExceeded]: DeadlineExceeded,
  [Code.Canceled]: Canceled,
};

/** The most specific `AgentrunError` subclass for `code`. */
export function errorFor(code: Code, message: string, reason?: string, cause?: ConnectError): AgentrunError {
  const Class = BY_CODE[code] ?? AgentrunError;
  return new Class(code, message, reason, cause);
}

/** Converts whatever a Connect call threw (an `AgentrunError` passes through). */
export function toAgentrunError(error: unknown): AgentrunError {
  if (error instanceof AgentrunError) return error;
  const e = ConnectError.from(error);
  // Connect merges the response headers and trailers into `metadata`; tonic sends an
  // error's metadata in the trailers (a trailers-only response puts it in the headers).
  const reason = e.metadata.get(REASON_METADATA_KEY) ?? undefined;
  return errorFor(e.code, e.rawMessage, reason, e);
}
