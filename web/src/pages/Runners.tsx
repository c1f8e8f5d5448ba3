// Runners: what each connected runner offers (labels, profiles), how busy it is (leases
// held against its slots), when it was last heard from, and a drain button.
import { useState } from "preact/hooks";

import { admin, errorText } from "../api";
import type { RunnerInfo } from "../gen/agentrun/v1/admin_service_pb";
import { href } from "../router";
import { fmtDuration, fmtTs, shortId, tsMs, useNow, usePoll } from "../util";

export function Runners() {
  const [list, setList] = useState<RunnerInfo[] | null>(null);
  const [error, setError] = useState("");
  const [notice, setNotice] = useState("");
  const now = useNow(1000);

  usePoll(
    async (signal) => {
      try {
        setList((await admin.listRunners({}, { signal })).runners);
        setError("");
      } catch (e) {
        if (!signal.aborted) setError(errorText(e));
      }
    },
    2000,
    [],
  );

  const drain = async (r: RunnerInfo) => {
    try {
      const res = await admin.drainRunner({ runnerId: r.runnerId });
      setNotice(res.found ? `draining ${r.name || r.runnerId}` : `${r.runnerId} is not connected`);
    } catch (e) {
      setNotice(errorText(e));
    }
  };

  return (
    <section>
      <div class="page-head">
        <h1>Runners</h1>
        {notice && <span class="muted">{notice}</span>}
      </div>
      {error && <p class="error">{error}</p>}
      <table class="grid">
        <thead>
          <tr>
            <th>runner</th>
            <th>name</th>
            <th>tenant</th>
            <th>labels</th>
            <th>profiles</th>
            <th>slots used</th>
            <th>last heartbeat</th>
            <th>replica</th>
            <th>version</th>
            <th>leases</th>
            <th />
          </tr>
        </thead>
        <tbody>
          {list?.map((r) => {
            const beat = tsMs(r.lastHeartbeatAt);
            return (
              <tr key={`${r.tenantId}/${r.runnerId}`} data-runner-id={r.runnerId}>
                <td class="mono" title={r.runnerId}>
                  {shortId(r.runnerId)}
                </td>
                <td>{r.name}</td>
                <td>{r.tenantId || "any"}</td>
                <td>{r.labels.join(", ")}</td>
                <td>{r.backendProfiles.join(", ")}</td>
                <td>
                  <Meter used={r.leases.length} limit={r.maxConcurrency} />
                </td>
                <td title={fmtTs(r.lastHeartbeatAt)}>{beat ? `${fmtDuration(now - beat)} ago` : "—"}</td>
                <td class="mono" title={r.replicaId}>
                  {r.replicaId ? shortId(r.replicaId) : "—"}
                </td>
                <td>{r.version}</td>
                <td class="mono">
                  {r.leases.slice(0, 3).map((l) => (
                    <a key={l.runId} href={href(["runs", l.runId])} title={`epoch ${l.epoch}`}>
                      {shortId(l.runId)}{" "}
                    </a>
                  ))}
                  {r.leases.length > 3 && `+${r.leases.length - 3}`}
                </td>
                <td>
                  {r.draining ? (
                    <span class="badge">draining</span>
                  ) : (
                    <button class="danger" onClick={() => drain(r)}>
                      Drain
                    </button>
                  )}
                </td>
              </tr>
            );
          })}
        </tbody>
      </table>
      {list !== null && list.length === 0 && <p class="muted">No runner is connected.</p>}
    </section>
  );
}

export function Meter({ used, limit }: { used: number; limit: number }) {
  const pct = limit > 0 ? Math.min(100, (used / limit) * 100) : 0;
  return (
    <span class="meter" title={`${used} of ${limit || "∞"}`}>
      <span class="meter-bar" style={{ width: `${pct}%` }} />
      <span class="meter-text">
        {used}/{limit || "∞"}
      </span>
    </span>
  );
}
