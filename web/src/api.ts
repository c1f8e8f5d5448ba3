// The UI's (and any browser's) client for agentrun: one gRPC-Web transport to the manager
// that served the page, typed clients for its three services, and the API key.
//
// gRPC-Web goes to the page's base URL (document.baseURI without its trailing slash), so
// the UI works under any --ui-base-path without knowing it. The key, if any, lives in
// sessionStorage and is sent as `authorization: Bearer KEY`; without one (agentrun dev
// without --auth) calls go out unauthenticated.
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";

import { AdminService } from "./gen/agentrun/v1/admin_service_pb";
import { RunService } from "./gen/agentrun/v1/run_service_pb";
import { SessionService } from "./gen/agentrun/v1/session_service_pb";

const KEY_STORAGE = "agentrun.apiKey";

export function apiKey(): string {
  return sessionStorage.getItem(KEY_STORAGE) ?? "";
}

export function setApiKey(key: string) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
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
 * Notes an error from any call: a refused key sends the UI back to the login box. Streams
 * report their errors while being read, so their readers call this too.
 */
export function noteError(error: unknown) {
  const e = ConnectError.from(error);
  if (e.code === Code.Unauthenticated || e.code === Code.PermissionDenied) {
    authRefused = e.rawMessage || Code[e.code];
    authListeners.forEach((listener) => listener());
  }
}

const auth: Interceptor = (next) => async (req) => {
  const key = apiKey();
  if (key) req.header.set("authorization", `Bearer ${key}`);
  try {
    return await next(req);
  } catch (error) {
    noteError(error);
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
  return `${Code[e.code] ?? "error"}: ${e.rawMessage}`;
}

export function isAborted(error: unknown): boolean {
  return ConnectError.from(error).code === Code.Canceled;
}
