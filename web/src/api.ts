// The UI's (and any browser's) client for agentrun: one gRPC-Web transport to the manager
// that served the page, typed clients for its three services, and the API keys.
//
// gRPC-Web goes to the page's base URL (document.baseURI without its trailing slash), so
// the UI works under any --ui-base-path without knowing it. Keys live in sessionStorage
// and are sent as `authorization: Bearer KEY`; without one (agentrun dev without --auth)
// calls go out unauthenticated. A key has one role: a client key may call RunService and
// SessionService, an admin key AdminService only, so an operator gives both and each call
// carries the one its service takes (the client key alone works; admin pages then say
// what they need).
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import { AdminService } from "./gen/agentrun/v1/admin_service_pb";
import { RunService } from "./gen/agentrun/v1/run_service_pb";
import { SessionService } from "./gen/agentrun/v1/session_service_pb";

const KEY_STORAGE = "agentrun.apiKey";
const ADMIN_KEY_STORAGE = "agentrun.adminKey";
const ADMIN_SERVICE = AdminService.typeName;

export function apiKey(): string {
  return sessionStorage.getItem(KEY_STORAGE) ?? "";
}

export function adminKey(): string {
  return sessionStorage.getItem(ADMIN_KEY_STORAGE) ?? "";
}

function store(name: string, value: string) {
  if (value) sessionStorage.setItem(name, value);
  else sessionStorage.removeItem(name);
}

export function setApiKeys(key: string, admin: string) {
  store(KEY_STORAGE, key);
  store(ADMIN_KEY_STORAGE, admin);
  authRefused = null;
  authListeners.forEach((listener) => listener());
}

/** The server's message when it last refused the key (UNAUTHENTICATED, PERMISSION_DENIED). */
let authRefused: string | null = null;
const authListeners = new Set<() => void>();

export function authError(): string | null {
  return authRefused;
}

export function onAuthChange(listener: () => void): () => void {
  authListeners.add(listener);
  return () => authListeners.delete(listener);
}

/**
 * Notes an error from a call: a refused key sends the UI back to the login box. Streams
 * report their errors while being read, so their readers call this too. An admin call
 * refused for its role is left to its page (a client key is enough for the rest).
 */
export function noteError(error: unknown, service = "") {
  const e = ConnectError.from(error);
  const adminRole = service === ADMIN_SERVICE && e.code === Code.PermissionDenied;
  if ((e.code === Code.Unauthenticated || e.code === Code.PermissionDenied) && !adminRole) {
    authRefused = e.rawMessage || Code[e.code];
    authListeners.forEach((listener) => listener());
  }
}

const auth: Interceptor = (next) => async (req) => {
  const service = req.service.typeName;
  const key = service === ADMIN_SERVICE ? adminKey() || apiKey() : apiKey();
  if (key) req.header.set("authorization", `Bearer ${key}`);
  try {
    return await next(req);
  } catch (error) {
    noteError(error, service);
    throw error;
  }
};

export const baseUrl = document.baseURI.replace(/\/+$/, "");

const transport = createGrpcWebTransport({ baseUrl, interceptors: [auth] });

export const runs = createClient(RunService, transport);
export const sessions = createClient(SessionService, transport);
export const admin = createClient(AdminService, transport);

/** A short text for an error from a call, for the page that made it. */
export function errorText(error: unknown): string {
  const e = ConnectError.from(error);
  const text = `${Code[e.code] ?? "error"}: ${e.rawMessage}`;
  return e.code === Code.PermissionDenied ? `${text} (this page needs an admin key: see "API key" above)` : text;
}

export function isAborted(error: unknown): boolean {
  return ConnectError.from(error).code === Code.Canceled;
}
