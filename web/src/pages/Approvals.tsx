// Approvals: the open requests across runs (RunService.ListRequests), answered with
// accept / accept for session / decline (ResolveRequest), with each one's deadline
// counting down. Refreshed every 2 s, so one answered elsewhere disappears.
import { useState } from "preact/hooks";

import { errorText, runs } from "../api";
import { href } from "../router";
import { fmtDuration, fmtTime, parseJson, shortId, tsMs, useNow, usePoll } from "../util";

interface OpenRequest {
  requestId: string;
  runId: string;
  kind: string;
  detail: unknown;
  options: string[];
  createdMs?: number;
  deadlineMs?: number;
}

/** More open requests than this are not one person's inbox; the first pages are shown. */
const MAX_SHOWN = 2000;

const DECISIONS: [string, string][] = [
  ["accept", "Accept"],
  ["accept_for_session", "Accept for session"],
  ["decline", "Decline"],
];

/** Every open request of the tenant (ListRequests' default), page by page. */
async function openRequests(signal: AbortSignal): Promise<OpenRequest[]> {
  const out: OpenRequest[] = [];
  let pageToken = "";
  do {
    const res = await runs.listRequests({ pageSize: 200, pageToken }, { signal });
    for (const r of res.requests) {
      out.push({
        requestId: r.requestId,
        runId: r.runId,
        kind: r.kind,
        detail: parseJson(r.detailJson),
        options: r.options,
        createdMs: tsMs(r.createdAt),
        deadlineMs: tsMs(r.deadline),
      });
    }
    pageToken = res.nextPageToken;
  } while (pageToken && out.length < MAX_SHOWN);
  return out;
}

export function Approvals() {
  const [list, setList] = useState<OpenRequest[] | null>(null);
  const [error, setError] = useState("");
  const [results, setResults] = useState<Record<string, string>>({});
  const now = useNow(1000);
  const [tick, setTick] = useState(0);

  usePoll(
    async (signal) => {
      try {
        setList(await openRequests(signal));
        setError("");
      } catch (e) {
        if (!signal.aborted) setError(errorText(e));
      }
    },
    2000,
    [tick],
  );

  const resolve = async (r: OpenRequest, decision: string) => {
    try {
      const res = await runs.resolveRequest({ runId: r.runId, requestId: r.requestId, decision });
      setResults({ ...results, [r.requestId]: res.resolvedNow ? `${decision}: done` : `already answered: ${res.resolutionJson}` });
    } catch (e) {
      setResults({ ...results, [r.requestId]: errorText(e) });
    }
    setTick(tick + 1);
  };

  return (
    <section>
      <div class="page-head">
        <h1>Approvals</h1>
        <span class="muted">{list ? `${list.length} open` : "loading…"}</span>
      </div>
      {error && <p class="error">{error}</p>}
      {list !== null && list.length === 0 && <p class="muted">Nothing is waiting for an answer.</p>}
      {list?.map((r) => (
        <div class="card request" key={r.requestId} data-request-id={r.requestId} data-run-id={r.runId}>
          <div class="row">
            <span class="badge">{r.kind}</span>
            <span>
              run{" "}
              <a class="mono" href={href(["runs", r.runId])} title={r.runId}>
                {shortId(r.runId)}
              </a>
            </span>
            <span class="muted">opened {fmtTime(r.createdMs)}</span>
            <span class="spacer" />
            {r.deadlineMs !== undefined ? (
              <span class={r.deadlineMs - now < 60_000 ? "warn-text" : "muted"} data-testid="deadline">
                {r.deadlineMs > now ? `answer within ${fmtDuration(r.deadlineMs - now)}` : "deadline passed"}
              </span>
            ) : (
              <span class="muted">no deadline</span>
            )}
          </div>
          <pre class="detail">{JSON.stringify(r.detail, null, 2)}</pre>
          <div class="row">
            {DECISIONS.map(([decision, label]) => (
              <button
                key={decision}
                class={decision === "decline" ? "danger" : "primary"}
                data-decision={decision}
                onClick={() => resolve(r, decision)}
              >
                {label}
              </button>
            ))}
            {r.options.length > 0 && <span class="muted">offered: {r.options.join(", ")}</span>}
            {results[r.requestId] && <span class="muted">{results[r.requestId]}</span>}
          </div>
        </div>
      ))}
    </section>
  );
}
