//! What a run's stream mode does to a runner's event batch before it is stored: the one
//! place that decides which `content.delta`s become stored events.
//!
//! - `deltas`: every event is stored as sent.
//! - `coalesced`: consecutive deltas of one item in the batch (same payload but for the
//!   `delta` text) are stored as one, their texts concatenated, cut where the merged
//!   payload would pass the payload limit. It carries the runner_seq of the last delta
//!   it holds, so the run's runner_seq (and with it resend detection) is unchanged.
//! - `final`: deltas are not stored; they go out live ([`Shaped::live`]). A delta marked
//!   `"text_in_deltas": true` is stored all the same: the runner re-sends the whole text
//!   of a reply too large for its `item.completed` that way (see the runner's `fit`).
//!
//! Shaping only ever runs on the fresh part of a batch (resends were dropped before), so
//! a resent batch is shaped the same way or not at all.

use std::borrow::Cow;

use agentrun_shared::events::EventType;
use agentrun_shared::state::StreamMode;
use serde_json::Value;

use super::RunnerEvent;

/// A fresh event batch as the run's stream mode keeps it: the batch's own events,
/// borrowed, but for merged ones.
#[derive(Debug, Default)]
pub(super) struct Shaped<'a> {
    /// What is stored, in order.
    pub stored: Vec<Cow<'a, RunnerEvent>>,
    /// Deltas fanned out live but not stored, each with how many of `stored` precede it.
    pub live: Vec<(usize, &'a RunnerEvent)>,
}

/// Shapes `fresh` for a run in `mode`; `max_payload_bytes` bounds a merged delta.
pub(super) fn shape(
    mode: StreamMode,
    fresh: &[RunnerEvent],
    max_payload_bytes: usize,
) -> Shaped<'_> {
    let mut shaped = Shaped::default();
    match mode {
        StreamMode::Deltas => shaped.stored = fresh.iter().map(Cow::Borrowed).collect(),
        StreamMode::Final => {
            for event in fresh {
                if event.event_type == EventType::ContentDelta
                    && event.payload()["text_in_deltas"] != Value::Bool(true)
                {
                    shaped.live.push((shaped.stored.len(), event));
                } else {
                    shaped.stored.push(Cow::Borrowed(event));
                }
            }
        }
        StreamMode::Coalesced => {
            // The stored events that took others in, by index.
            let mut merged_into = Vec::new();
            for event in fresh {
                let merged = shaped
                    .stored
                    .last_mut()
                    .is_some_and(|last| merge(last, event, max_payload_bytes));
                if !merged {
                    shaped.stored.push(Cow::Borrowed(event));
                } else if merged_into.last() != Some(&(shaped.stored.len() - 1)) {
                    merged_into.push(shaped.stored.len() - 1);
                }
            }
            for i in merged_into {
                shaped.stored[i].to_mut().payload_changed();
            }
        }
    }
    shaped
}

/// Appends `next`'s text to `into` when both are deltas of the same item and stream (every
/// field but `delta` equal) and the merged payload fits `max_payload_bytes`.
fn merge(into: &mut Cow<'_, RunnerEvent>, next: &RunnerEvent, max_payload_bytes: usize) -> bool {
    if into.event_type != EventType::ContentDelta || next.event_type != EventType::ContentDelta {
        return false;
    }
    let (Value::Object(a), Value::Object(b)) = (into.payload(), next.payload()) else {
        return false;
    };
    let (Some(Value::String(_)), Some(Value::String(more))) = (a.get("delta"), b.get("delta"))
    else {
        return false;
    };
    let same_item = a.len() == b.len()
        && a.iter()
            .all(|(key, value)| key == "delta" || b.get(key) == Some(value));
    // Serialized sizes add up: the frame once, plus each text as escaped.
    let merged_bytes = into.payload_bytes + escaped_len(more);
    if !same_item || merged_bytes > max_payload_bytes {
        return false;
    }
    let into = into.to_mut();
    if let Some(Value::String(text)) = into.payload_mut().get_mut("delta") {
        text.push_str(more);
    }
    into.runner_seq = next.runner_seq;
    into.payload_bytes = merged_bytes;
    true
}

/// Bytes `text` takes inside a JSON string.
fn escaped_len(text: &str) -> usize {
    Value::String(text.to_owned()).to_string().len() - 2
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(runner_seq: i64, event_type: EventType, payload: Value) -> RunnerEvent {
        let sent = payload.to_string();
        RunnerEvent::new(runner_seq, event_type, payload, &sent)
    }

    fn delta(runner_seq: i64, item: &str, text: &str) -> RunnerEvent {
        event(
            runner_seq,
            EventType::ContentDelta,
            json!({"item_id": item, "kind": "assistant_text", "delta": text}),
        )
    }

    fn texts<'a>(events: &'a [Cow<'_, RunnerEvent>]) -> Vec<(i64, &'a str)> {
        events
            .iter()
            .map(|e| (e.runner_seq, e.payload()["delta"].as_str().unwrap_or("-")))
            .collect()
    }

    #[test]
    fn deltas_mode_keeps_the_batch_as_sent() {
        let batch = [delta(1, "a", "x"), delta(2, "a", "y")];
        let shaped = shape(StreamMode::Deltas, &batch, 1024);
        assert_eq!(texts(&shaped.stored), [(1, "x"), (2, "y")]);
        assert!(shaped.live.is_empty());
    }

    #[test]
    fn coalesced_merges_runs_of_one_item_and_keeps_the_last_runner_seq() {
        let started = event(
            1,
            EventType::ItemStarted,
            json!({"item_id": "a", "kind": "assistant_message"}),
        );
        let reasoning = event(
            5,
            EventType::ContentDelta,
            json!({"item_id": "a", "kind": "reasoning_text", "delta": "hm"}),
        );
        let batch = [
            started,
            delta(2, "a", "Hel"),
            delta(3, "a", "lo \"you\""),
            delta(4, "b", "!"),
            reasoning,
            delta(6, "a", "?"),
            delta(7, "a", "!"),
        ];
        let shaped = shape(StreamMode::Coalesced, &batch, 1024);
        assert_eq!(
            texts(&shaped.stored),
            [
                (1, "-"),
                (3, "Hello \"you\""),
                (4, "!"),
                (5, "hm"),
                (7, "?!")
            ]
        );
        let merged = &shaped.stored[1];
        assert_eq!(merged.payload()["kind"], "assistant_text");
        assert_eq!(merged.payload_bytes, merged.payload().to_string().len());
        for e in &shaped.stored {
            assert_eq!(e.json, e.payload().to_string(), "the text is the payload's");
        }
    }

    #[test]
    fn coalesced_redacts_a_secret_split_across_deltas() {
        let key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789";
        let (head, tail) = key.split_at(12);
        let batch = [delta(1, "a", &format!("key {head}")), delta(2, "a", tail)];
        assert!(batch.iter().all(|e| !e.json.contains("[REDACTED]")));
        let shaped = shape(StreamMode::Coalesced, &batch, 1024);
        assert_eq!(shaped.stored.len(), 1);
        let merged = &shaped.stored[0];
        assert!(!merged.json.contains(tail), "{}", merged.json);
        assert!(merged.json.contains("[REDACTED]"), "{}", merged.json);
        assert_eq!(merged.json, merged.payload().to_string());
    }

    #[test]
    fn coalesced_cuts_a_merge_at_the_payload_limit() {
        let piece = "x".repeat(400);
        let batch: Vec<RunnerEvent> = (1..=6).map(|i| delta(i, "a", &piece)).collect();
        let shaped = shape(StreamMode::Coalesced, &batch, 1024);
        assert_eq!(
            shaped.stored.len(),
            3,
            "two pieces fit a payload, three do not"
        );
        for e in &shaped.stored {
            assert!(e.payload().to_string().len() <= 1024);
            assert_eq!(e.payload_bytes, e.payload().to_string().len());
        }
        let text: String = shaped
            .stored
            .iter()
            .map(|e| e.payload()["delta"].as_str().unwrap())
            .collect();
        assert_eq!(text, piece.repeat(6));
    }

    #[test]
    fn final_sends_deltas_live_and_stores_the_rest_and_whole_text_replays() {
        let done = event(
            4,
            EventType::ItemCompleted,
            json!({"item_id": "a", "kind": "assistant_message", "text": "ab"}),
        );
        let replay = event(
            5,
            EventType::ContentDelta,
            json!({"item_id": "a", "kind": "assistant_text", "delta": "ab", "text_in_deltas": true}),
        );
        let started = event(
            1,
            EventType::ItemStarted,
            json!({"item_id": "a", "kind": "assistant_message"}),
        );
        let batch = [
            started,
            delta(2, "a", "a"),
            delta(3, "a", "b"),
            done,
            replay,
        ];
        let shaped = shape(StreamMode::Final, &batch, 1024);
        let stored: Vec<i64> = shaped.stored.iter().map(|e| e.runner_seq).collect();
        assert_eq!(stored, [1, 4, 5]);
        let live: Vec<(usize, i64)> = shaped
            .live
            .iter()
            .map(|(at, e)| (*at, e.runner_seq))
            .collect();
        assert_eq!(
            live,
            [(1, 2), (1, 3)],
            "each after the stored events before it"
        );
    }
}
