// Sessions: active / unread / read (ListSessions, filter in the URL), mark read, and the
// selected session's output-only transcript (ListSessionEvents).
import { useState } from "preact/hooks";

import { errorText, sessions } from "../api";
import type { SessionView } from "../gen/agentrun/v1/session_service_pb";
import { SessionAttention, SessionStateFilter } from "../gen/agentrun/v1/session_service_pb";
import type { Event } from "../gen/agentrun/v1/types_pb";
import { href, navigate } from "../router";
import { fmtTs, parseJson, shortId, statusName, usePoll } from "../util";

const STATES: [string, SessionStateFilter][] = [
  ["default", SessionStateFilter.DEFAULT],
  ["active", SessionStateFilter.RUNNING],
  ["unread", SessionStateFilter.UNREAD],
  ["read", SessionStateFilter.IDLE],
  ["ended", SessionStateFilter.TERMINAL],
  ["all", SessionStateFilter.ALL],
];

export function Sessions({ query }: { query: URLSearchParams }) {
  const stateName = query.get("state") ?? "default";
  const state = STATES.find(([n]) => n === stateName)?.[1] ?? SessionStateFilter.DEFAULT;
  const open = query.get("id") ?? "";
  const [list, setList] = useState<SessionView[] | null>(null);
  const [error, setError] = useState("");
  const [tick, setTick] = useState(0);

  usePoll(
    async (signal) => {
      try {
        const res = await sessions.listSessions({ state, pageSize: 100 }, { signal });
        setList(res.sessions);
        setError("");
      } catch (e) {
        if (!signal.aborted) setError(errorText(e));
      }
    },
    2000,
    [state, tick],
  );

  const markRead = async (id: string) => {
    try {
      await sessions.markSessionRead({ sessionId: id });
    } catch (e) {
      setError(errorText(e));
    }
    setTick(tick + 1);
  };

  return (
    <section>
      <div class="page-head">
        <h1>Sessions</h1>
      </div>
      <div class="counts">
        {STATES.map(([name]) => (
          <a key={name} class={`chip${name === stateName ? " on" : ""}`} href={href(["sessions"], { state: name, id: open })}>
            {name}
          </a>
        ))}
      </div>
      {error && <p class="error">{error}</p>}
      <table class="grid">
        <thead>
          <tr>
            <th>session</th>
            <th>title</th>
            <th>profile</th>
            <th>attention</th>
            <th>last run</th>
            <th>updated</th>
            <th />
          </tr>
        </thead>
        <tbody>
          {list?.map((v) => {
            const s = v.session!;
            const attention = (SessionAttention[v.attention] ?? "").toLowerCase();
            return (
              <tr key={s.sessionId} class={s.sessionId === open ? "picked" : ""}>
                <td class="mono">
                  <a href={href(["sessions"], { state: stateName, id: s.sessionId })} title={s.sessionId}>
                    {shortId(s.sessionId)}
                  </a>
                </td>
                <td>{s.title}</td>
                <td>{s.backendProfile}</td>
                <td>
                  <span class={`badge attention-${attention}`}>{attention}</span>
                </td>
                <td>
                  {s.lastRunId && (
                    <a class="mono" href={href(["runs", s.lastRunId])}>
                      {shortId(s.lastRunId)}
                    </a>
                  )}{" "}
                  {statusName(v.lastRunStatus)}
                </td>
                <td class="mono">{fmtTs(s.updatedAt)}</td>
                <td>
                  <button disabled={v.attention !== SessionAttention.UNREAD} onClick={() => markRead(s.sessionId)}>
                    Mark read
                  </button>
                </td>
              </tr>
            );
          })}
        </tbody>
      </table>
      {list !== null && list.length === 0 && <p class="muted">No sessions.</p>}
      {open && <Transcript key={open} sessionId={open} onClose={() => navigate(["sessions"], { state: stateName })} />}
    </section>
  );
}

function Transcript({ sessionId, onClose }: { sessionId: string; onClose: () => void }) {
  const [events, setEvents] = useState<Event[]>([]);
  const [error, setError] = useState("");
  usePoll(
    async (signal) => {
      try {
        const out: Event[] = [];
        let afterRunId = "";
        let afterSeq = 0n;
        for (let page = 0; page < 50; page++) {
          const res = await sessions.listSessionEvents({ sessionId, outputOnly: true, afterRunId, afterSeq, limit: 1000 }, { signal });
          out.push(...res.events);
          if (res.events.length < 1000) break;
          const last = res.events[res.events.length - 1];
          afterRunId = last.runId;
          afterSeq = last.seq;
        }
        setEvents(out);
        setError("");
      } catch (e) {
        if (!signal.aborted) setError(errorText(e));
      }
    },
    3000,
    [sessionId],
  );

  // One block per run: its reply text, errors and its end.
  const blocks: { runId: string; text: string; notes: string[] }[] = [];
  for (const ev of events) {
    let block = blocks[blocks.length - 1];
    if (!block || block.runId !== ev.runId) {
      block = { runId: ev.runId, text: "", notes: [] };
      blocks.push(block);
    }
    const p = (parseJson(ev.payloadJson) ?? {}) as Record<string, unknown>;
    if (ev.type === "content.delta" && typeof p.delta === "string") block.text += p.delta;
    else if (ev.type === "item.completed" && typeof p.text === "string" && !block.text) block.text = p.text;
    else if (ev.type === "runtime.error") block.notes.push(`error: ${String(p.message ?? ev.payloadJson)}`);
    else if (ev.type === "run.terminal") block.notes.push(`ended ${String(p.status ?? "")}`);
  }
  return (
    <div class="card transcript">
      <div class="page-head">
        <h2>
          Transcript <span class="mono">{sessionId}</span>
        </h2>
        <button onClick={onClose}>Close</button>
      </div>
      {error && <p class="error">{error}</p>}
      {blocks.length === 0 && <p class="muted">No output yet.</p>}
      {blocks.map((b) => (
        <div key={b.runId} class="turn-block">
          <a class="mono" href={href(["runs", b.runId])}>
            run {shortId(b.runId)}
          </a>
          <pre class="reply">{b.text}</pre>
          {b.notes.map((n, i) => (
            <div key={i} class="muted">
              {n}
            </div>
          ))}
        </div>
      ))}
    </div>
  );
}
