// A run's events as the run page holds them: stored events in seq order (each seq once,
// whatever reconnects resend), the rows of the timeline (consecutive content.delta events
// of one item collapsed into one row), the reply text per item, and the times the header
// derives from events. Kept outside preact's state so that 100,000 events cost one array
// push each; the page re-renders at most once per frame.
import type { Event } from "./gen/agentrun/v1/types_pb";
import { parseJson, tsMs } from "./util";

type Payload = Record<string, unknown>;

export interface Row {
  /** Index of the row's first event in `events`. */
  first: number;
  /** Index of its last event (first == last unless deltas were collapsed). */
  last: number;
  /** 1-based turn the row belongs to (0: before the first turn). */
  turn: number;
  /** Collapsed deltas: their text so far, cut at PREVIEW characters. */
  preview?: string;
  /** A requeue, a new lease epoch, an error: shown marked. */
  mark?: string;
}

const PREVIEW = 240;

export class Timeline {
  events: Event[] = [];
  payloads: Payload[] = [];
  rows: Row[] = [];
  /** Per event: the mark shown when deltas are not collapsed. */
  marks: (string | undefined)[] = [];
  /** Per event: its turn. */
  turns: number[] = [];
  lastSeq = 0n;
  turn = 0;
  maxEpoch = 0n;
  claimedMs?: number;
  firstTokenMs?: number;
  terminalMs?: number;
  terminal = false;
  runnerId = "";
  /** Reply text per item, in the order items first appeared. */
  items = new Map<string, { pieces: string[]; final?: string }>();
  /** Open requests: request.opened without a request.resolved yet. */
  openRequests = new Map<string, Payload>();
  /** Events dropped because their seq had been seen (a resend after a reconnect). */
  duplicates = 0;

  /** Adds an event from a page or the stream; false if it was already held. */
  add(ev: Event): boolean {
    const payload = (parseJson(ev.payloadJson) ?? {}) as Payload;
    if (ev.ephemeral) {
      // A FINAL-mode delta: live text only; it has no seq of its own.
      this.addReply(ev, payload);
      return true;
    }
    if (ev.seq <= this.lastSeq) {
      this.duplicates++;
      return false;
    }
    this.lastSeq = ev.seq;
    const index = this.events.length;
    this.events.push(ev);
    this.payloads.push(payload);
    const ms = tsMs(ev.createdAt);

    let mark: string | undefined;
    switch (ev.type) {
      case "turn.started":
        this.turn++;
        break;
      case "run.claimed":
        this.claimedMs ??= ms;
        break;
      case "run.requeued":
        mark = "requeued";
        break;
      case "runtime.error":
        mark = "error";
        break;
      case "run.terminal":
        this.terminal = true;
        this.terminalMs = ms;
        break;
      case "content.delta":
        this.firstTokenMs ??= ms;
        break;
      case "request.opened":
        this.openRequests.set(String(payload.request_id), payload);
        break;
      case "request.resolved":
        this.openRequests.delete(String(payload.request_id));
        break;
    }
    if (ev.runnerId) this.runnerId = ev.runnerId;
    if (ev.epoch > this.maxEpoch) {
      // A later lease epoch writing: the run was claimed again (a lost lease or a requeue).
      if (this.maxEpoch > 0n) mark ??= `new lease (epoch ${ev.epoch})`;
      this.maxEpoch = ev.epoch;
    }
    this.marks.push(mark);
    this.turns.push(this.turn);
    this.addReply(ev, payload);

    const lastRow = this.rows[this.rows.length - 1];
    if (
      ev.type === "content.delta" &&
      !mark &&
      lastRow?.preview !== undefined &&
      this.payloads[lastRow.last].item_id === payload.item_id
    ) {
      lastRow.last = index;
      if (lastRow.preview.length < PREVIEW) lastRow.preview = (lastRow.preview + deltaText(payload)).slice(0, PREVIEW);
    } else {
      this.rows.push({
        first: index,
        last: index,
        turn: this.turn,
        mark,
        preview: ev.type === "content.delta" ? deltaText(payload).slice(0, PREVIEW) : undefined,
      });
    }
    return true;
  }

  private addReply(ev: Event, payload: Payload) {
    const id = String(payload.item_id ?? "");
    if (ev.type === "content.delta" && payload.kind === "assistant_text") {
      this.item(id).pieces.push(deltaText(payload));
    } else if (ev.type === "item.completed" && payload.kind === "assistant_message" && typeof payload.text === "string") {
      this.item(id).final = payload.text;
    }
  }

  private item(id: string) {
    let item = this.items.get(id);
    if (!item) {
      item = { pieces: [] };
      this.items.set(id, item);
    }
    return item;
  }

  /** The reply: each item's text, the completed text where known. */
  reply(): string {
    const parts: string[] = [];
    for (const item of this.items.values()) parts.push(item.final ?? item.pieces.join(""));
    return parts.join("\n\n");
  }
}

function deltaText(payload: Payload): string {
  return typeof payload.delta === "string" ? payload.delta : "";
}
