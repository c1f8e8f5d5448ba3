// Formatting and small hooks shared by the pages.
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { useEffect, useRef, useState } from "preact/hooks";

import { RunStatus } from "./gen/agentrun/v1/types_pb";

export const STATUSES: RunStatus[] = [
  RunStatus.PENDING,
  RunStatus.CLAIMED,
  RunStatus.RUNNING,
  RunStatus.WAITING,
  RunStatus.COMPLETED,
  RunStatus.FAILED,
  RunStatus.CANCELLED,
  RunStatus.BLOCKED,
  RunStatus.EXPIRED,
];

export const ACTIVE_STATUSES = STATUSES.slice(0, 4);

export function statusName(status: RunStatus): string {
  return (RunStatus[status] ?? "unspecified").toLowerCase();
}

export function parseStatus(name: string): RunStatus | undefined {
  const value = (RunStatus as unknown as Record<string, number>)[name.toUpperCase()];
  return value ? (value as RunStatus) : undefined;
}

export function isTerminal(status: RunStatus): boolean {
  return status >= RunStatus.COMPLETED;
}

export function tsMs(ts: Timestamp | undefined): number | undefined {
  return ts ? timestampMs(ts) : undefined;
}

export function fmtTime(ms: number | undefined): string {
  if (ms === undefined) return "—";
  const d = new Date(ms);
  const pad = (n: number, w = 2) => String(n).padStart(w, "0");
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`
  );
}

export function fmtTs(ts: Timestamp | undefined): string {
  return fmtTime(tsMs(ts));
}

export function fmtDuration(ms: number): string {
  const sign = ms < 0 ? "-" : "";
  let s = Math.abs(ms) / 1000;
  if (s < 1) return `${sign}${Math.round(s * 1000)} ms`;
  if (s < 60) return `${sign}${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  s = Math.floor(s % 60);
  if (m < 60) return `${sign}${m}m ${s}s`;
  return `${sign}${Math.floor(m / 60)}h ${m % 60}m`;
}

/** The end of an id: agentrun's ids are UUIDv7, whose first digits are a timestamp that
 * runs created together share, so the random tail is what tells them apart. */
export function shortId(id: string): string {
  return id.length > 12 ? `…${id.slice(-8)}` : id;
}

export function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

export function prettyJson(text: string): string {
  const value = parseJson(text);
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

/** Calls `fn` now and every `ms` while mounted (and `deps` unchanged); skips overlaps. */
export function usePoll(fn: (signal: AbortSignal) => Promise<void>, ms: number, deps: unknown[]) {
  const latest = useRef(fn);
  latest.current = fn;
  useEffect(() => {
    const abort = new AbortController();
    let busy = false;
    const tick = async () => {
      if (busy) return;
      busy = true;
      try {
        await latest.current(abort.signal);
      } finally {
        busy = false;
      }
    };
    void tick();
    const timer = setInterval(tick, ms);
    return () => {
      clearInterval(timer);
      abort.abort();
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, deps);
}

/** The current time, re-rendered every `ms` (for countdowns and ages). */
export function useNow(ms = 1000): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(timer);
  }, [ms]);
  return now;
}
