// Queues: depth per queue and status, the oldest pending run's age, and each tenant's
// load against its limit on active runs (AdminService.GetQueueStats).
import { useState } from "preact/hooks";

import { admin, errorText } from "../api";
import type { GetQueueStatsResponse } from "../gen/agentrun/v1/admin_service_pb";
import { href } from "../router";
import { ACTIVE_STATUSES, fmtDuration, statusName, usePoll } from "../util";
import { Meter } from "./Runners";

export function Queues() {
  const [stats, setStats] = useState<GetQueueStatsResponse | null>(null);
  const [error, setError] = useState("");
  usePoll(
    async (signal) => {
      try {
        setStats(await admin.getQueueStats({}, { signal }));
        setError("");
      } catch (e) {
        if (!signal.aborted) setError(errorText(e));
      }
    },
    2000,
    [],
  );

  const queues = new Map<string, Map<number, bigint>>();
  for (const d of stats?.depths ?? []) {
    if (!queues.has(d.queue)) queues.set(d.queue, new Map());
    queues.get(d.queue)!.set(d.status, d.runs);
  }
  for (const a of stats?.ages ?? []) if (!queues.has(a.queue)) queues.set(a.queue, new Map());
  const age = (q: string) => stats?.ages.find((a) => a.queue === q)?.oldestPendingAgeMs;

  return (
    <section>
      <div class="page-head">
        <h1>Queues</h1>
      </div>
      {error && <p class="error">{error}</p>}
      <table class="grid">
        <thead>
          <tr>
            <th>queue</th>
            {ACTIVE_STATUSES.map((s) => (
              <th key={s}>{statusName(s)}</th>
            ))}
            <th>oldest pending</th>
          </tr>
        </thead>
        <tbody>
          {[...queues.keys()].sort().map((q) => (
            <tr key={q}>
              <td>
                <a href={href(["runs"], { queue: q })}>{q}</a>
              </td>
              {ACTIVE_STATUSES.map((s) => (
                <td key={s} class="num">
                  <a href={href(["runs"], { queue: q, status: statusName(s) })}>{String(queues.get(q)!.get(s) ?? 0n)}</a>
                </td>
              ))}
              <td>{age(q) !== undefined ? fmtDuration(Number(age(q))) : "—"}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {stats && queues.size === 0 && <p class="muted">Every queue is empty.</p>}
      <h2>Tenants</h2>
      <table class="grid">
        <thead>
          <tr>
            <th>tenant</th>
            <th>pending</th>
            <th>active vs limit</th>
            <th>delta retention</th>
          </tr>
        </thead>
        <tbody>
          {stats?.tenants.map((t) => (
            <tr key={t.tenantId}>
              <td>{t.tenantId}</td>
              <td class="num">{String(t.pendingRuns)}</td>
              <td>
                <Meter used={Number(t.activeRuns)} limit={t.maxActiveRuns} />
              </td>
              <td>{t.eventRetentionMs ? fmtDuration(Number(t.eventRetentionMs)) : "forever"}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {stats && stats.tenants.length === 0 && <p class="muted">No tenant has pending or active runs.</p>}
    </section>
  );
}
