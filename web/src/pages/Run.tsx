// Run: the header (status, attempt/epoch, runner, created → claimed → first token →
// terminal), the live reply, the timeline (virtualised; deltas collapsed unless
// `?deltas=all`), raw JSON of a clicked row, and the command bar.
//
// Events are read in pages (ListEvents, 1,000 at a time) up to the run's last seq, then
// followed with WatchRun from the last seq held. When the stream fails (a manager
// restart, a network blip) it is reopened from the last seq with a growing backoff; the
// timeline drops any seq it already holds, so no event is shown twice.
import { Code, ConnectError } from "@connectrpc/connect";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";

import { errorText, noteError, runs } from "../api";
import type { Run } from "../gen/agentrun/v1/types_pb";
import { CommandKind, TurnDeliveryPolicy } from "../gen/agentrun/v1/types_pb";
import { href, navigate } from "../router";
import { Timeline, type Row } from "../timeline";
import { VirtualList } from "../VirtualList";
import { fmtDuration, fmtTime, fmtTs, isTerminal, statusName, tsMs, usePoll } from "../util";

const PAGE = 1000;
const ROW_HEIGHT = 24;
const LIST_HEIGHT = 432;
const BACKOFF_MIN_MS = 250;
const BACKOFF_MAX_MS = 4000;

function sleep(ms: number, signal: AbortSignal) {
  return new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

function isAuthError(error: unknown) {
  const code = ConnectError.from(error).code;
  return code === Code.Unauthenticated || code === Code.PermissionDenied;
}

/** Reads the run's events into `tl` and follows it until its end or `signal`. */
async function follow(runId: string, tl: Timeline, signal: AbortSignal, changed: () => void, setConn: (s: string) => void) {
  let backoff = BACKOFF_MIN_MS;
  while (!signal.aborted) {
    try {
      // Catch up in pages: cheap for a long run, and the stream then starts near the end.
      for (;;) {
        setConn("loading");
        const page = await runs.listEvents({ runId, afterSeq: tl.lastSeq, limit: PAGE }, { signal });
        page.events.forEach((ev) => tl.add(ev));
        changed();
        if (page.endOfRun && tl.lastSeq >= page.lastSeq) {
          setConn("ended");
          return;
        }
        if (page.events.length === 0 || tl.lastSeq >= page.lastSeq) break;
      }
      setConn("live");
      for await (const ev of runs.watchRun({ runId, afterSeq: tl.lastSeq }, { signal })) {
        tl.add(ev);
        changed();
        backoff = BACKOFF_MIN_MS;
      }
      if (tl.terminal) {
        setConn("ended");
        return;
      }
      // The stream ended without the run's end (a replica stopping): reopen it.
    } catch (error) {
      if (signal.aborted) return;
      noteError(error);
      if (isAuthError(error)) return;
      setConn(`reconnecting (${errorText(error)})`);
    }
    await sleep(backoff, signal);
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
  }
}

export function RunPage({ runId, query }: { runId: string; query: URLSearchParams }) {
  const tl = useMemo(() => new Timeline(), [runId]);
  const [version, setVersion] = useState(0);
  const [conn, setConn] = useState("loading");
  const [run, setRun] = useState<Run | null>(null);
  const [runError, setRunError] = useState("");
  const [picked, setPicked] = useState<number | null>(null);
  const expanded = query.get("deltas") === "all";

  useEffect(() => {
    const abort = new AbortController();
    let frame = 0;
    const changed = () => {
      if (!frame) {
        frame = requestAnimationFrame(() => {
          frame = 0;
          setVersion((v) => v + 1);
        });
      }
    };
    void follow(runId, tl, abort.signal, changed, setConn);
    return () => {
      abort.abort();
      cancelAnimationFrame(frame);
    };
  }, [runId]);

  const terminalSeen = tl.terminal;
  usePoll(
    async (signal) => {
      if (run && isTerminal(run.status)) return;
      try {
        const res = await runs.getRun({ runId }, { signal });
        setRun(res.run ?? null);
        setRunError("");
      } catch (e) {
        if (!signal.aborted) setRunError(errorText(e));
      }
    },
    2000,
    [runId, terminalSeen],
  );

  const rowCount = expanded ? tl.events.length : tl.rows.length;
  const rowAt = (i: number): Row =>
    expanded ? { first: i, last: i, turn: tl.turns[i], mark: tl.marks[i] } : tl.rows[i];

  const createdMs = tsMs(run?.createdAt);
  const claimedMs = tsMs(run?.claimedAt) ?? tl.claimedMs;
  const terminalMs = tsMs(run?.finishedAt) ?? tl.terminalMs;
  const clock = (ms: number | undefined) => fmtTime(ms).slice(ms === undefined ? 0 : 11);
  const since = (ms: number | undefined) =>
    ms !== undefined && createdMs !== undefined ? ` (+${fmtDuration(ms - createdMs)})` : "";

  return (
    <section class="run-page">
      <div class="page-head">
        <h1>
          Run <span class="mono">{runId}</span>
        </h1>
        <a href={href(["runs"])}>← all runs</a>
      </div>
      {runError && <p class="error">{runError}</p>}
      <div class="card run-header">
        <div>
          <span class="label">status</span>
          <span class={`badge status-${run ? statusName(run.status) : "unknown"}`} data-testid="run-status">
            {run ? statusName(run.status) : "…"}
          </span>
          {run?.cancelRequested && !isTerminal(run.status) && <span class="muted"> cancel requested</span>}
        </div>
        <div>
          <span class="label">attempt</span>
          {run ? `${run.attempt}/${run.maxAttempts}` : "…"}
          <span class="label">epoch</span>
          {run ? String(run.leaseEpoch) : "…"}
        </div>
        <div>
          <span class="label">runner</span>
          <span class="mono">{run?.leaseRunnerId || tl.runnerId || "—"}</span>
        </div>
        <div>
          <span class="label">profile</span>
          {run?.backendProfile} <span class="label">queue</span>
          {run?.queue}
          {run?.sessionId && (
            <>
              <span class="label">session</span>
              <a class="mono" href={href(["runs"], { session: run.sessionId })}>
                {run.sessionId}
              </a>
            </>
          )}
        </div>
        <div class="times">
          <span class="label">created</span> {fmtTs(run?.createdAt)} → <span class="label">claimed</span>{" "}
          {clock(claimedMs)}
          {since(claimedMs)} → <span class="label">first token</span> {clock(tl.firstTokenMs)}
          {since(tl.firstTokenMs)} → <span class="label">terminal</span> {clock(terminalMs)}
          {since(terminalMs)}
        </div>
        {run && <Origin run={run} />}
        {run?.failureKind && (
          <div class="error">
            {run.failureKind}: {run.failureMessage}
          </div>
        )}
        <div>
          <span class="label">events</span>
          <span data-testid="event-count" data-count={tl.events.length} data-last-seq={String(tl.lastSeq)}>
            {tl.events.length} held, last seq {String(tl.lastSeq)}
          </span>
          <span class="label">stream</span>
          <span data-testid="stream-state" class={conn.startsWith("reconnecting") ? "warn-text" : ""}>
            {conn}
          </span>
        </div>
      </div>

      <CommandBar runId={runId} run={run} activeTurn={run?.activeTurnId ?? ""} />

      {tl.openRequests.size > 0 && (
        <div class="card open-requests">
          <strong>Waiting for an answer:</strong>{" "}
          {[...tl.openRequests.keys()].map((id) => (
            <span key={id} class="mono">
              {id}{" "}
            </span>
          ))}
          <a href={href(["approvals"])}>answer in Approvals →</a>
        </div>
      )}

      <h2>Reply</h2>
      <Reply text={tl.reply()} ended={conn === "ended"} />

      <div class="page-head">
        <h2>Timeline</h2>
        <label class="inline">
          <input
            type="checkbox"
            checked={!expanded}
            data-testid="collapse-deltas"
            onChange={() => navigate(["runs", runId], { deltas: expanded ? undefined : "all" })}
          />
          collapse deltas
        </label>
      </div>
      <div class="timeline-head vrow-grid">
        <span>seq</span>
        <span>time</span>
        <span>turn</span>
        <span>type</span>
        <span>payload</span>
      </div>
      <VirtualList
        count={rowCount}
        rowHeight={ROW_HEIGHT}
        height={LIST_HEIGHT}
        version={version}
        renderRow={(i) => {
          const row = rowAt(i);
          const ev = tl.events[row.first];
          const n = row.last - row.first + 1;
          const lastSeq = tl.events[row.last].seq;
          return (
            <div
              class={`vrow-grid event${row.mark ? " marked" : ""}${picked === i ? " picked" : ""}${
                ev.type === "turn.started" ? " turn-start" : ""
              }`}
              data-seq={String(lastSeq)}
              onClick={() => setPicked(picked === i ? null : i)}
            >
              <span class="mono">{n > 1 ? `${ev.seq}–${lastSeq}` : String(ev.seq)}</span>
              <span class="mono">{fmtTime(tsMs(ev.createdAt)).slice(11)}</span>
              <span>{row.turn || ""}</span>
              <span class={`type type-${ev.type.replace(".", "-")}`}>
                {ev.type}
                {n > 1 && <span class="count">×{n}</span>}
              </span>
              <span class="payload">
                {row.mark && <span class="mark">{row.mark}</span>}
                {row.preview !== undefined ? JSON.stringify(row.preview + (n > 1 ? "…" : "")) : ev.payloadJson}
              </span>
            </div>
          );
        }}
      />
      {picked !== null && picked < rowCount && <RawEvents tl={tl} row={rowAt(picked)} />}
    </section>
  );
}

/** Beyond this many characters only the reply's end is shown (a huge reply would make
 * every frame lay out megabytes of text), unless asked for in full. */
const REPLY_TAIL = 20_000;

function Reply({ text, ended }: { text: string; ended: boolean }) {
  const [full, setFull] = useState(false);
  const cut = !full && text.length > REPLY_TAIL;
  return (
    <>
      {cut && (
        <p class="muted">
          The first {text.length - REPLY_TAIL} characters are hidden.{" "}
          <button class="link" onClick={() => setFull(true)}>
            Show the whole reply
          </button>
        </p>
      )}
      <pre class="reply" data-testid="reply" data-length={text.length}>
        {(cut ? text.slice(-REPLY_TAIL) : text) || (ended ? "(no reply)" : "…")}
      </pre>
    </>
  );
}

function RawEvents({ tl, row }: { tl: Timeline; row: Row }) {
  const ev = tl.events[row.first];
  const n = row.last - row.first + 1;
  const raw = (i: number) => {
    const e = tl.events[i];
    return JSON.stringify(
      {
        seq: String(e.seq),
        type: e.type,
        producer: e.producer,
        runner_id: e.runnerId,
        epoch: String(e.epoch),
        created_at: fmtTs(e.createdAt),
        payload: tl.payloads[i],
      },
      null,
      2,
    );
  };
  return (
    <div class="card raw" data-testid="raw-json">
      <div class="page-head">
        <strong>
          {ev.type} seq {String(ev.seq)}
          {n > 1 && ` – ${tl.events[row.last].seq} (${n} events)`}
        </strong>
      </div>
      {n > 1 && (
        <pre>
          {tl.events
            .slice(row.first, Math.min(row.last + 1, row.first + 2000))
            .map((_, k) => String(tl.payloads[row.first + k].delta ?? ""))
            .join("")}
        </pre>
      )}
      <pre>{raw(row.first)}</pre>
      {n > 1 && <pre>{raw(row.last)}</pre>}
    </div>
  );
}

const POLICIES: [TurnDeliveryPolicy, string][] = [
  [TurnDeliveryPolicy.QUEUE, "queue"],
  [TurnDeliveryPolicy.INTERRUPT, "interrupt"],
  [TurnDeliveryPolicy.STEER, "steer"],
  [TurnDeliveryPolicy.REJECT, "reject"],
];

// Where the run came from (re-run, fork, schedule), its concurrency key, and why it
// waits when it is pending and held back.
function Origin({ run }: { run: Run }) {
  const link = (id: string) => (
    <a class="mono" href={href(["runs", id])}>
      {id}
    </a>
  );
  const parts = [
    run.waitingReason && (
      <span data-testid="waiting-reason">
        <span class="label">waiting for</span> {run.waitingReason.replace("_", " ")}
      </span>
    ),
    run.concurrencyKey && (
      <span>
        <span class="label">concurrency key</span> <span class="mono">{run.concurrencyKey}</span>
      </span>
    ),
    run.rerunOfRunId && (
      <span data-testid="rerun-of">
        <span class="label">re-run of</span> {link(run.rerunOfRunId)}
      </span>
    ),
    run.forkedFromRunId && (
      <span>
        <span class="label">forked from</span> {link(run.forkedFromRunId)}{" "}
        <span class="label">turn</span> <span class="mono">{run.forkedFromTurnId}</span>
      </span>
    ),
    run.scheduleId && (
      <span>
        <span class="label">schedule</span> <span class="mono">{run.scheduleId}</span>
      </span>
    ),
  ].filter(Boolean);
  return parts.length ? <div class="origin">{parts}</div> : null;
}

function CommandBar({ runId, run, activeTurn }: { runId: string; run: Run | null; activeTurn: string }) {
  const [prompt, setPrompt] = useState("");
  const [policy, setPolicy] = useState(TurnDeliveryPolicy.QUEUE);
  const [steer, setSteer] = useState("");
  const [result, setResult] = useState("");
  const ended = run ? isTerminal(run.status) : false;
  const busy = useRef(false);

  const act = async (what: string, call: () => Promise<unknown>) => {
    if (busy.current) return;
    busy.current = true;
    try {
      await call();
      setResult(`${what}: sent`);
    } catch (e) {
      setResult(`${what}: ${errorText(e)}`);
    } finally {
      busy.current = false;
    }
  };
  const send = (kind: CommandKind, payload: object, extra: { deliveryPolicy?: TurnDeliveryPolicy } = {}) =>
    runs.sendCommand({ runId, kind, payloadJson: JSON.stringify(payload), ...extra });

  return (
    <div class="card command-bar">
      <form
        class="row"
        onSubmit={(e) => {
          e.preventDefault();
          void act("turn", () => send(CommandKind.TURN, { prompt }, { deliveryPolicy: policy })).then(() => setPrompt(""));
        }}
      >
        <input name="turn" placeholder="next turn's prompt" value={prompt} onInput={(e) => setPrompt(e.currentTarget.value)} />
        <select
          name="policy"
          aria-label="delivery policy"
          value={String(policy)}
          onChange={(e) => setPolicy(Number(e.currentTarget.value) as TurnDeliveryPolicy)}
        >
          {POLICIES.map(([value, name]) => (
            <option key={name} value={String(value)}>
              {name}
            </option>
          ))}
        </select>
        <button type="submit" disabled={ended || !prompt}>
          Send turn
        </button>
      </form>
      <form
        class="row"
        onSubmit={(e) => {
          e.preventDefault();
          void act("steer", () => send(CommandKind.STEER, { text: steer })).then(() => setSteer(""));
        }}
      >
        <input name="steer" placeholder="steer the active turn" value={steer} onInput={(e) => setSteer(e.currentTarget.value)} />
        <button type="submit" disabled={ended || !steer || !activeTurn}>
          Steer
        </button>
        <button type="button" disabled={ended || !activeTurn} onClick={() => act("interrupt", () => send(CommandKind.INTERRUPT, {}))}>
          Interrupt
        </button>
        <button
          type="button"
          class="danger"
          data-testid="cancel-run"
          disabled={ended}
          onClick={() => act("cancel", () => runs.cancelRun({ runId, reason: "cancelled from the UI" }))}
        >
          Cancel run
        </button>
        <button
          type="button"
          data-testid="rerun-run"
          disabled={!ended}
          onClick={() =>
            act("rerun", async () => {
              const made = await runs.rerunRun({ runId });
              if (made.run) navigate(["runs", made.run.runId]);
            })
          }
        >
          Run again
        </button>
        {result && <span class="muted">{result}</span>}
      </form>
    </div>
  );
}
