// The client: RunService's verbs as methods over any Connect transport, errors rejected as
// `AgentrunError`s, pages walked by async iterators, and a `watchRun` that resumes by
// itself. No transport is chosen here: the Node entry (index.ts) defaults to gRPC over
// HTTP/2, the browser entry (browser.ts) to gRPC-Web.
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type CallOptions, type Client as ConnectClient, type Transport } from "@connectrpc/connect";

import { RunService, type ResolveRequestResponse } from "./gen/agentrun/v1/run_service_pb.js";
import {
  CommandKind,
  Producer,
  RunStatus,
  StreamMode,
  TurnDeliveryPolicy,
  type Command,
  type Event as EventMessage,
  type Request,
  type Run,
} from "./gen/agentrun/v1/types_pb.js";
import { AgentrunError, errorFor, toAgentrunError } from "./errors.js";

/** Sent on every call so the manager can tell SDK traffic apart. */
export const USER_AGENT = "agentrun-typescript";

/** The event type that ends a run's log; `watchRun` returns after it. */
export const TERMINAL_EVENT = "run.terminal";

export interface ClientOptions {
  /**
   * Node: the manager's gRPC address, `http://host:port` (or `https://`). Browsers: the
   * UI's origin and base path (e.g. `http://127.0.0.1:7401`), which serves gRPC-Web.
   * Ignored when `transport` is given.
   */
  url?: string;
  /** Sent as `authorization: Bearer <key>` when the manager requires keys. */
  apiKey?: string;
  /**
   * The `agentrun-tenant` header: whom to act for when the manager runs without
   * authentication (`agentrun dev`); ignored when keys are checked.
   */
  tenant?: string;
  /** A Connect transport of your own (`grpcWebTransport(baseUrl)`, or one with TLS options). */
  transport?: Transport;
  /** How long each unary call may take, in ms (default 30 000; 0: no limit). Watches have `deadlineMs`. */
  timeoutMs?: number;
}

/** A run's statuses by name ("pending", "completed", ...) or value. */
export type RunStatusName = "pending" | "claimed" | "running" | "waiting" | "completed" | "failed" | "cancelled" | "expired";
export type CommandKindName = "turn" | "steer" | "interrupt" | "cancel" | "resume";
export type StreamModeName = "deltas" | "coalesced" | "final";
export type DeliveryPolicyName = "queue" | "interrupt" | "steer" | "reject";

export interface CreateRunOptions {
  projectId?: string;
  queue?: string;
  priority?: number;
  labels?: string[];
  maxAttempts?: number;
  queueTimeoutMs?: number;
  runTimeoutMs?: number;
  /** Any JSON object, stored with the run. */
  metadata?: Record<string, unknown>;
  sessionId?: string;
  /** The same key returns the original run (`created` false on the manager's side). */
  idempotencyKey?: string;
  scheduledAt?: Date;
  streamMode?: StreamModeName | StreamMode;
}

export interface ListRunsFilters {
  statuses?: Array<RunStatusName | RunStatus>;
  queue?: string;
  sessionId?: string;
  projectId?: string;
  backendProfile?: string;
  labels?: string[];
  createdAfter?: Date;
  createdBefore?: Date;
  pageSize?: number;
}

export interface SendOptions {
  /** A turn's prompt or a steer's text (goes into the payload where the kind expects it). */
  text?: string;
  /** More payload fields (a JSON object). */
  payload?: Record<string, unknown>;
  /** For turns: what happens when another turn is active. */
  deliveryPolicy?: DeliveryPolicyName | TurnDeliveryPolicy;
  idempotencyKey?: string;
  expectedTurnId?: string;
}

export interface ResolveOptions {
  /** Answers to a user-input request (a JSON object). */
  answers?: Record<string, unknown>;
  /** An external tool's result (any JSON value). */
  value?: unknown;
  /** An external tool's failure. */
  error?: string;
}

export interface ListRequestsOptions {
  /** One run's requests; all of the tenant's when omitted. */
  runId?: string;
  /** "open" (the default on the server), "resolved", "cancelled", "expired". */
  statuses?: string[];
  pageSize?: number;
}

export interface ListEventsOptions {
  afterSeq?: number | bigint;
  /** Events per page (the server's default when omitted). */
  limit?: number;
}

export interface WatchOptions {
  /** Start after this seq (0: from the first event). */
  afterSeq?: number | bigint;
  /** Stops the watch: the iterator rejects with `Canceled`. */
  signal?: AbortSignal;
  /** Bounds the whole watch, reconnects included; then it rejects with `DeadlineExceeded`. */
  deadlineMs?: number;
  /** The cap of the reconnect backoff, in ms (default 5000). */
  maxBackoffMs?: number;
  /**
   * Called before each reconnect with why the stream broke (undefined: it ended before
   * run.terminal), the seq it resumes after and the wait in ms; for logging.
   */
  onReconnect?: (info: { error: AgentrunError | undefined; afterSeq: number; delayMs: number }) => void;
}

/** One event of a run's log, as `watchRun` and `listEvents` yield it. */
export interface Event {
  runId: string;
  /**
   * Strictly increasing per run. An `ephemeral` event (a live `content.delta` of a
   * `final`-mode run, never stored) carries the seq of the stored event it follows.
   */
  seq: number;
  type: string;
  /** `payload_json`, parsed. */
  payload: Record<string, unknown>;
  ephemeral: boolean;
  /** "manager" or "runner". */
  producer: string;
  runnerId: string;
  epoch: number;
  createdAt: Date | undefined;
  /** The `agentrun.v1.Event` message itself. */
  raw: EventMessage;
}

export function eventFromMessage(message: EventMessage): Event {
  let payload: unknown = {};
  if (message.payloadJson) payload = JSON.parse(message.payloadJson);
  const producer = Producer[message.producer];
  return {
    runId: message.runId,
    seq: Number(message.seq),
    type: message.type,
    payload: isObject(payload) ? payload : { value: payload },
    ephemeral: message.ephemeral,
    producer: producer ? producer.toLowerCase() : String(message.producer),
    runnerId: message.runnerId,
    epoch: Number(message.epoch),
    createdAt: message.createdAt ? timestampDate(message.createdAt) : undefined,
    raw: message,
  };
}

/** A connection to an agentrun manager. */
export class Client {
  /** The raw RunService client, for calls the SDK does not wrap (pass `client.callOptions()`). */
  readonly runs: ConnectClient<typeof RunService>;
  readonly transport: Transport;
  readonly timeoutMs: number;
  private readonly headers: Record<string, string>;

  constructor(options: ClientOptions, defaultTransport?: (url: string) => Transport) {
    let transport = options.transport;
    if (!transport) {
      if (!options.url) throw new TypeError("Client: give `url` (e.g. http://127.0.0.1:7400) or `transport`");
      if (!defaultTransport) throw new TypeError("Client: no default transport here; give `transport`");
      transport = defaultTransport(options.url);
    }
    this.transport = transport;
    this.runs = createClient(RunService, transport);
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.headers = { "x-user-agent": USER_AGENT };
    if (options.apiKey) this.headers["authorization"] = `Bearer ${options.apiKey}`;
    if (options.tenant) this.headers["agentrun-tenant"] = options.tenant;
  }

  /** The headers (key, tenant) and timeout every call of this client carries. */
  callOptions(extra: CallOptions = {}): CallOptions {
    const timeoutMs = extra.timeoutMs ?? (this.timeoutMs > 0 ? this.timeoutMs : undefined);
    return { ...extra, timeoutMs, headers: { ...this.headers, ...headersObject(extra.headers) } };
  }

  private async call<T>(fn: (options: CallOptions) => Promise<T>): Promise<T> {
    try {
      return await fn(this.callOptions());
    } catch (error) {
      throw toAgentrunError(error);
    }
  }

  // ---- runs -------------------------------------------------------------------------

  /**
   * Creates a run and returns it (`runId`, `status`, ...). `input` is the run's input
   * object; its "prompt" starts the first turn.
   */
  async createRun(backendProfile: string, input: Record<string, unknown>, options: CreateRunOptions = {}): Promise<Run> {
    checkObject(input, "input");
    const request = {
      backendProfile,
      inputJson: JSON.stringify(input),
      projectId: options.projectId,
      queue: options.queue,
      priority: options.priority,
      labels: options.labels,
      maxAttempts: options.maxAttempts,
      queueTimeoutMs: options.queueTimeoutMs === undefined ? undefined : BigInt(options.queueTimeoutMs),
      runTimeoutMs: options.runTimeoutMs === undefined ? undefined : BigInt(options.runTimeoutMs),
      metadataJson: options.metadata === undefined ? undefined : JSON.stringify(checkObject(options.metadata, "metadata")),
      sessionId: options.sessionId,
      idempotencyKey: options.idempotencyKey,
      scheduledAt: options.scheduledAt ? timestampFromDate(options.scheduledAt) : undefined,
      streamMode: options.streamMode === undefined ? undefined : enumValue(StreamMode, options.streamMode, "streamMode"),
    };
    const response = await this.call((o) => this.runs.createRun(request, o));
    return required(response.run, "CreateRunResponse.run");
  }

  async getRun(runId: string): Promise<Run> {
    const response = await this.call((o) => this.runs.getRun({ runId }, o));
    return required(response.run, "GetRunResponse.run");
  }

  /** Every run matching the filters, newest first, fetching pages as you iterate. */
  async *listRuns(filters: ListRunsFilters = {}): AsyncGenerator<Run, void, undefined> {
    const request = {
      statuses: (filters.statuses ?? []).map((s) => enumValue(RunStatus, s, "statuses")),
      queue: filters.queue,
      sessionId: filters.sessionId,
      projectId: filters.projectId,
      backendProfile: filters.backendProfile,
      labels: filters.labels,
      createdAfter: filters.createdAfter ? timestampFromDate(filters.createdAfter) : undefined,
      createdBefore: filters.createdBefore ? timestampFromDate(filters.createdBefore) : undefined,
      pageSize: filters.pageSize,
      pageToken: "",
    };
    for (;;) {
      const response = await this.call((o) => this.runs.listRuns(request, o));
      yield* response.runs;
      if (!response.nextPageToken) return;
      request.pageToken = response.nextPageToken;
    }
  }

  /** Cancels a run (idempotent while it is being cancelled); returns it. */
  async cancel(runId: string, reason = ""): Promise<Run> {
    const response = await this.call((o) => this.runs.cancelRun({ runId, reason }, o));
    return required(response.run, "CancelRunResponse.run");
  }

  /**
   * Appends a command: kind "turn" (`text` = the prompt), "steer" (`text`), "interrupt",
   * "resume" or "cancel"; `payload` adds fields. Returns the Command.
   */
  async send(runId: string, kind: CommandKindName | CommandKind, options: SendOptions = {}): Promise<Command> {
    const kindValue = enumValue(CommandKind, kind, "kind");
    const body: Record<string, unknown> = { ...(options.payload ? checkObject(options.payload, "payload") : {}) };
    if (options.text !== undefined) {
      if (kindValue === CommandKind.TURN) body["prompt"] = options.text;
      else if (kindValue === CommandKind.STEER) body["text"] = options.text;
      else throw new TypeError("send: `text` applies to `turn` (the prompt) and `steer` only; use `payload`");
    }
    const request = {
      runId,
      kind: kindValue,
      payloadJson: JSON.stringify(body),
      deliveryPolicy:
        options.deliveryPolicy === undefined ? undefined : enumValue(TurnDeliveryPolicy, options.deliveryPolicy, "deliveryPolicy"),
      idempotencyKey: options.idempotencyKey,
      expectedTurnId: options.expectedTurnId,
    };
    const response = await this.call((o) => this.runs.sendCommand(request, o));
    return required(response.command, "SendCommandResponse.command");
  }

  // ---- requests (approvals, user input) -------------------------------------------

  /**
   * Answers an open request: decision "accept", "accept_for_session", "decline" or
   * "cancel". The first answer wins: check `resolvedNow` and `resolutionJson`.
   */
  async resolve(runId: string, requestId: string, decision: string, options: ResolveOptions = {}): Promise<ResolveRequestResponse> {
    const request = {
      runId,
      requestId,
      decision,
      answersJson: options.answers === undefined ? undefined : JSON.stringify(checkObject(options.answers, "answers")),
      valueJson: options.value === undefined ? undefined : JSON.stringify(options.value),
      error: options.error,
    };
    return this.call((o) => this.runs.resolveRequest(request, o));
  }

  /** Requests newest first, all pages: of one run or of every run; by default the open ones. */
  async *listRequests(options: ListRequestsOptions = {}): AsyncGenerator<Request, void, undefined> {
    const request = { runId: options.runId ?? "", statuses: options.statuses ?? [], pageSize: options.pageSize, pageToken: "" };
    for (;;) {
      const response = await this.call((o) => this.runs.listRequests(request, o));
      yield* response.requests;
      if (!response.nextPageToken) return;
      request.pageToken = response.nextPageToken;
    }
  }

  // ---- events ---------------------------------------------------------------------

  /**
   * The run's stored events with seq > afterSeq, oldest first, page by page, up to the
   * last one stored when the final page was read.
   */
  async *listEvents(runId: string, options: ListEventsOptions = {}): AsyncGenerator<Event, void, undefined> {
    let cursor = BigInt(options.afterSeq ?? 0);
    for (;;) {
      const afterSeq = cursor;
      const response = await this.call((o) => this.runs.listEvents({ runId, afterSeq, limit: options.limit }, o));
      for (const message of response.events) {
        cursor = message.seq;
        yield eventFromMessage(message);
      }
      if (response.events.length === 0 || cursor >= response.lastSeq) return;
    }
  }

  /**
   * Follows a run: its stored events with seq > afterSeq, then live ones, ending after
   * `run.terminal`.
   *
   * Resumes by itself when the stream breaks (manager restart or replica loss, a proxy
   * or network cut: UNAVAILABLE, a reset connection, or a stream that ends before
   * run.terminal): it reconnects from the last stored seq it yielded, waiting between
   * attempts with exponential backoff and jitter capped at `maxBackoffMs`. It never
   * yields a stored seq twice and skips none. Ephemeral events are yielded but do not
   * move the resume point. Other errors (NotFound, ...) reject at once. Leaving the loop
   * (`break`) cancels the stream.
   */
  async *watchRun(runId: string, options: WatchOptions = {}): AsyncGenerator<Event, void, undefined> {
    const end = options.deadlineMs === undefined ? undefined : Date.now() + options.deadlineMs;
    const cursor = new Cursor(BigInt(options.afterSeq ?? 0));
    const backoff = new Backoff(100, options.maxBackoffMs ?? 5000);
    const userSignal = options.signal;
    const expired = () =>
      errorFor(
        Code.DeadlineExceeded,
        `watch of run ${runId} did not reach ${TERMINAL_EVENT} within ${options.deadlineMs} ms (last seq ${cursor.seq})`,
      );
    let broken: AgentrunError | undefined;
    for (;;) {
      if (userSignal?.aborted) throw errorFor(Code.Canceled, `watch of run ${runId} aborted`);
      const remaining = end === undefined ? undefined : end - Date.now();
      if (remaining !== undefined && remaining <= 0) throw expired();
      const attempt = new AbortController();
      const onAbort = () => attempt.abort();
      userSignal?.addEventListener("abort", onAbort);
      try {
        // No per-call timeout unless the watch has a deadline: a watch lasts as long as its run.
        const stream = this.runs.watchRun(
          { runId, afterSeq: cursor.seq },
          {
            headers: this.callOptions().headers,
            timeoutMs: remaining === undefined ? undefined : Math.max(1, Math.ceil(remaining)),
            signal: attempt.signal,
          },
        );
        for await (const message of stream) {
          backoff.reset();
          if (!cursor.admit(message)) continue;
          const event = eventFromMessage(message);
          yield event;
          if (event.type === TERMINAL_EVENT && !event.ephemeral) return;
        }
        // The stream ended without run.terminal (a manager shutting down): resume.
        broken = undefined;
      } catch (error) {
        if (userSignal?.aborted) throw errorFor(Code.Canceled, `watch of run ${runId} aborted`);
        const e = toAgentrunError(error);
        if (e.code === Code.DeadlineExceeded && end !== undefined && Date.now() >= end - 5) throw expired();
        if (!isTransient(e)) throw e;
        broken = e;
      } finally {
        userSignal?.removeEventListener("abort", onAbort);
        attempt.abort(); // cancels the stream when the consumer left the loop
      }
      let delay = backoff.nextDelay();
      if (end !== undefined) delay = Math.max(0, Math.min(delay, end - Date.now()));
      options.onReconnect?.({ error: broken, afterSeq: Number(cursor.seq), delayMs: delay });
      await sleep(delay, userSignal);
    }
  }
}

/**
 * The watch's resume point: the last stored seq handed out. Ephemeral events never move
 * it; a stored event at or below it (a replay) is dropped, so no seq is yielded twice.
 */
export class Cursor {
  constructor(public seq: bigint) {}

  admit(message: { seq: bigint; ephemeral: boolean }): boolean {
    if (message.ephemeral) return true;
    if (message.seq <= this.seq) return false;
    this.seq = message.seq;
    return true;
  }
}

/** Capped exponential backoff with jitter; reset once the stream delivers again. */
export class Backoff {
  private current: number;
  constructor(
    private readonly initialMs: number,
    private readonly capMs: number,
  ) {
    this.current = Math.min(initialMs, capMs);
  }

  reset(): void {
    this.current = Math.min(this.initialMs, this.capMs);
  }

  nextDelay(): number {
    const delay = this.current;
    this.current = Math.min(this.capMs, this.current * 2);
    return delay * (0.5 + Math.random() * 0.5);
  }
}

// How transports report a connection that went away under a stream, besides UNAVAILABLE:
// HTTP/2 resets and GOAWAYs (Node), fetch's "terminated" / "network error" (gRPC-Web).
const CONNECTION_MARKERS = [
  "rst_stream",
  "goaway",
  "reset",
  "socket",
  "closed",
  "premature",
  "terminated",
  "network",
  "fetch failed",
  "econnrefused",
  "aborted",
  "protocol error",
  "missing trailer",
  "missing endstream",
];

/** Whether a broken watch should be resumed rather than reported. */
export function isTransient(error: AgentrunError): boolean {
  if (error.code === Code.Unavailable) return true;
  if (error.code === Code.Internal || error.code === Code.Unknown || error.code === Code.Canceled || error.code === Code.Aborted) {
    const text = `${error.message} ${error.cause?.cause instanceof Error ? error.cause.cause.message : ""}`.toLowerCase();
    return CONNECTION_MARKERS.some((marker) => text.includes(marker));
  }
  return false;
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(errorFor(Code.Canceled, "watch aborted"));
    const onAbort = () => {
      clearTimeout(timer);
      reject(errorFor(Code.Canceled, "watch aborted"));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function checkObject<T>(value: T, option: string): T {
  if (!isObject(value)) throw new TypeError(`${option} must be a plain object (a JSON object)`);
  return value;
}

function required<T>(value: T | undefined, what: string): T {
  if (value === undefined) throw new AgentrunError(Code.Internal, `the manager's response has no ${what}`);
  return value;
}

function headersObject(headers: CallOptions["headers"]): Record<string, string> {
  if (!headers) return {};
  return Object.fromEntries(new Headers(headers as HeadersInit).entries());
}

/** A proto enum value from its short name ("completed"), full name or number. */
export function enumValue<E extends number>(enumObject: Record<string, string | number>, value: string | number, option: string): E {
  if (typeof value === "number") {
    if (enumObject[value] === undefined) throw new RangeError(`${option}: ${value} is not a known value`);
    return value as E;
  }
  const name = value.trim().toUpperCase();
  for (const candidate of [name, name.replace(/^[A-Z_]*?_(?=[A-Z]+$)/, "")]) {
    const found = enumObject[candidate];
    if (typeof found === "number" && found !== 0) return found as E;
  }
  const names = Object.keys(enumObject)
    .filter((k) => Number.isNaN(Number(k)) && k !== "UNSPECIFIED")
    .map((k) => k.toLowerCase());
  throw new RangeError(`${option}: ${JSON.stringify(value)} is not one of ${names.join(", ")}`);
}

export { ConnectError };
