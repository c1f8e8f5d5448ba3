// Runs: the filtered list (filters in the URL), live counts per status, cursor paging,
// selection with bulk cancel, and the "New run" form.
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { useRef, useState } from "preact/hooks";

import { admin, errorText, runs } from "../api";
import { ListRunsRequestSchema } from "../gen/agentrun/v1/run_service_pb";
import type { Run } from "../gen/agentrun/v1/types_pb";
import { RunStatus } from "../gen/agentrun/v1/types_pb";
import { href, navigate } from "../router";
import { ACTIVE_STATUSES, STATUSES, fmtTs, isTerminal, parseStatus, shortId, statusName, usePoll } from "../util";

const PAGE_SIZE = 50;
const FILTERS = ["status", "queue", "session", "profile", "label", "after", "before"] as const;
type Filters = Record<(typeof FILTERS)[number], string>;

function readFilters(query: URLSearchParams): Filters {
  const f = {} as Filters;
  for (const name of FILTERS) f[name] = query.get(name) ?? "";
  return f;
}

function splitList(text: string): string[] {
  return text
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
}

function listRequest(f: Filters, cursor: string) {
  const ms = (text: string) => (text ? timestampFromMs(Date.parse(text)) : undefined);
  return create(ListRunsRequestSchema, {
    statuses: splitList(f.status)
      .map(parseStatus)
      .filter((s): s is RunStatus => s !== undefined),
    queue: f.queue,
    sessionId: f.session,
    backendProfile: f.profile,
    labels: splitList(f.label),
    createdAfter: ms(f.after),
    createdBefore: ms(f.before),
    pageSize: PAGE_SIZE,
    pageToken: cursor,
  });
}

export function Runs({ query }: { query: URLSearchParams }) {
  const filters = readFilters(query);
  const cursor = query.get("cursor") ?? "";
  const [list, setList] = useState<Run[] | null>(null);
  const [next, setNext] = useState("");
  const [error, setError] = useState("");
  const [counts, setCounts] = useState<Map<RunStatus, number> | null>(null);
  const [countsError, setCountsError] = useState("");
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const [notice, setNotice] = useState("");
  const [showNew, setShowNew] = useState(false);
  const previous = useRef<string[]>([]);

  const go = (changes: Partial<Filters> & { cursor?: string }) => {
    navigate(["runs"], { ...filters, cursor: undefined, ...changes });
  };

  usePoll(
    async (signal) => {
      try {
        const res = await runs.listRuns(listRequest(filters, cursor), { signal });
        setList(res.runs);
        setNext(res.nextPageToken);
        setError("");
      } catch (e) {
        if (!signal.aborted) setError(errorText(e));
      }
      try {
        const stats = await admin.getQueueStats({}, { signal });
        const m = new Map<RunStatus, number>();
        for (const d of stats.depths) {
          if (filters.queue && d.queue !== filters.queue) continue;
          m.set(d.status, (m.get(d.status) ?? 0) + Number(d.runs));
        }
        setCounts(m);
        setCountsError("");
      } catch (e) {
        // Counts need an admin key; the list works without them.
        setCounts(null);
        if (!signal.aborted) setCountsError(errorText(e));
      }
    },
    2000,
    [query.toString()],
  );

  const toggle = (id: string) => {
    const s = new Set(selected);
    if (s.has(id)) s.delete(id);
    else s.add(id);
    setSelected(s);
  };
  const cancelSelected = async () => {
    const ids = [...selected];
    const results = await Promise.allSettled(ids.map((runId) => runs.cancelRun({ runId, reason: "cancelled from the UI" })));
    const failed = results.filter((r) => r.status === "rejected") as PromiseRejectedResult[];
    setNotice(
      `cancelled ${ids.length - failed.length} of ${ids.length}` +
        (failed.length ? `; ${failed.map((r) => errorText(r.reason)).join("; ")}` : ""),
    );
    setSelected(new Set());
  };

  const activeStatuses = splitList(filters.status);
  const visible = list ?? [];
  const allSelected = visible.length > 0 && visible.every((r) => selected.has(r.runId));

  return (
    <section>
      <div class="page-head">
        <h1>Runs</h1>
        <button class="primary" onClick={() => setShowNew(!showNew)}>
          New run
        </button>
      </div>
      {showNew && <NewRun />}
      <div class="counts" aria-label="live counts">
        <a href={href(["runs"], { ...filters, status: undefined })} class={activeStatuses.length ? "chip" : "chip on"}>
          all
        </a>
        {STATUSES.map((s) => {
          const name = statusName(s);
          const n = counts?.get(s);
          return (
            <a
              key={name}
              href={href(["runs"], { ...filters, status: name })}
              class={`chip status-${name}${activeStatuses.includes(name) ? " on" : ""}`}
              data-status={name}
            >
              {name}
              {ACTIVE_STATUSES.includes(s) && counts && <span class="count">{n ?? 0}</span>}
            </a>
          );
        })}
        {countsError && (
          <span class="muted" title={countsError}>
            live counts need an admin key
          </span>
        )}
      </div>
      <form
        class="filters"
        onSubmit={(e) => {
          e.preventDefault();
          const data = new FormData(e.currentTarget);
          const changes: Partial<Filters> = {};
          for (const name of FILTERS) changes[name] = String(data.get(name) ?? "");
          go(changes);
        }}
      >
        <label>
          status
          <input name="status" value={filters.status} placeholder="running,waiting" />
        </label>
        <label>
          queue
          <input name="queue" value={filters.queue} />
        </label>
        <label>
          profile
          <input name="profile" value={filters.profile} />
        </label>
        <label>
          labels
          <input name="label" value={filters.label} placeholder="gpu,eu" />
        </label>
        <label>
          session
          <input name="session" value={filters.session} />
        </label>
        <label>
          created after
          <input name="after" type="datetime-local" value={filters.after} />
        </label>
        <label>
          before
          <input name="before" type="datetime-local" value={filters.before} />
        </label>
        <button type="submit">Filter</button>
        <a class="button" href={href(["runs"])}>
          Clear
        </a>
      </form>
      {error && <p class="error">{error}</p>}
      <div class="toolbar">
        <button class="danger" disabled={selected.size === 0} onClick={cancelSelected} data-testid="bulk-cancel">
          Cancel selected ({selected.size})
        </button>
        {notice && <span class="muted">{notice}</span>}
        <span class="spacer" />
        <button
          disabled={!cursor}
          onClick={() => go({ cursor: previous.current.pop() || undefined })}
        >
          ← Prev
        </button>
        <button
          disabled={!next}
          onClick={() => {
            previous.current.push(cursor);
            go({ cursor: next });
          }}
        >
          Next →
        </button>
      </div>
      <table class="grid runs-table">
        <thead>
          <tr>
            <th>
              <input
                type="checkbox"
                aria-label="select all"
                checked={allSelected}
                onChange={() => setSelected(allSelected ? new Set() : new Set(visible.filter((r) => !isTerminal(r.status)).map((r) => r.runId)))}
              />
            </th>
            <th>id</th>
            <th>status</th>
            <th>queue</th>
            <th>profile</th>
            <th>labels</th>
            <th>session</th>
            <th>created</th>
            <th>attempt</th>
          </tr>
        </thead>
        <tbody>
          {visible.map((r) => (
            <tr key={r.runId} data-run-id={r.runId}>
              <td>
                <input
                  type="checkbox"
                  aria-label={`select ${r.runId}`}
                  checked={selected.has(r.runId)}
                  onChange={() => toggle(r.runId)}
                />
              </td>
              <td class="mono">
                <a href={href(["runs", r.runId])} title={r.runId}>
                  {shortId(r.runId)}
                </a>
              </td>
              <td>
                <span class={`badge status-${statusName(r.status)}`}>{statusName(r.status)}</span>
              </td>
              <td>{r.queue}</td>
              <td>{r.backendProfile}</td>
              <td>{r.labels.join(", ")}</td>
              <td class="mono">
                {r.sessionId && (
                  <a href={href(["runs"], { session: r.sessionId })} title={r.sessionId}>
                    {shortId(r.sessionId)}
                  </a>
                )}
              </td>
              <td class="mono">{fmtTs(r.createdAt)}</td>
              <td>
                {r.attempt}/{r.maxAttempts}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {list !== null && list.length === 0 && <p class="muted">No runs match.</p>}
    </section>
  );
}

function NewRun() {
  const [profile, setProfile] = useState("scripted");
  const [prompt, setPrompt] = useState("");
  const [queue, setQueue] = useState("");
  const [labels, setLabels] = useState("");
  const [session, setSession] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    try {
      const res = await runs.createRun({
        backendProfile: profile,
        inputJson: JSON.stringify({ prompt }),
        queue,
        labels: splitList(labels),
        sessionId: session,
      });
      navigate(["runs", res.run!.runId]);
    } catch (err) {
      setError(errorText(err));
      setBusy(false);
    }
  };
  return (
    <form class="card new-run" onSubmit={submit}>
      <h2>New run</h2>
      <div class="row">
        <label>
          profile
          <input name="profile" value={profile} onInput={(e) => setProfile(e.currentTarget.value)} required />
        </label>
        <label>
          queue
          <input name="queue" value={queue} placeholder="default" onInput={(e) => setQueue(e.currentTarget.value)} />
        </label>
        <label>
          labels
          <input name="labels" value={labels} onInput={(e) => setLabels(e.currentTarget.value)} />
        </label>
        <label>
          session
          <input name="session" value={session} placeholder="none" onInput={(e) => setSession(e.currentTarget.value)} />
        </label>
      </div>
      <label class="wide">
        prompt
        <textarea name="prompt" rows={3} value={prompt} onInput={(e) => setPrompt(e.currentTarget.value)} />
      </label>
      {error && <p class="error">{error}</p>}
      <button type="submit" class="primary" disabled={busy}>
        Create run
      </button>
    </form>
  );
}
