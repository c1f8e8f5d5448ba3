// Hash routing: `#/runs?status=running`, `#/runs/<id>`, `#/approvals`, ... The server
// only ever serves index.html; a page's filters live in the query part of the hash, so
// a URL names exactly what is on screen.
import { useEffect, useState } from "preact/hooks";

export interface Route {
  /** Path segments after `#/`, e.g. ["runs", "<id>"]. */
  parts: string[];
  query: URLSearchParams;
}

export function parseHash(hash: string): Route {
  const text = hash.replace(/^#\/?/, "");
  const [path, query = ""] = text.split("?", 2);
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, query: new URLSearchParams(query) };
}

export function href(parts: string[], query?: Record<string, string | undefined>): string {
  const path = parts.map(encodeURIComponent).join("/");
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query ?? {})) {
    if (value) params.set(name, value);
  }
  const q = params.toString();
  return `#/${path}${q ? `?${q}` : ""}`;
}

export function navigate(parts: string[], query?: Record<string, string | undefined>) {
  location.hash = href(parts, query);
}

export function useRoute(): Route {
  const [route, setRoute] = useState(() => parseHash(location.hash));
  useEffect(() => {
    const update = () => setRoute(parseHash(location.hash));
    window.addEventListener("hashchange", update);
    return () => window.removeEventListener("hashchange", update);
  }, []);
  return route;
}
