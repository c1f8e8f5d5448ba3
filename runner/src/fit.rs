//! Making events fit the manager's payload limit before they enter a run's outbox.
//!
//! The manager refuses any event whose `payload_json` is longer than its
//! `max_payload_bytes` (it says how long in `Welcome`), and a refused event can never be
//! sent: the run would stall behind it. So an event is made to fit once, when it is
//! pushed, and the outbox only ever holds sendable events:
//!
//! - a `content.delta` is split into several `content.delta`s with the same other fields
//!   (item, kind), each carrying a consecutive piece of the text, cut on char boundaries;
//!   concatenated, the pieces are the original delta;
//! - any other event (or a delta whose other fields alone are too large) is truncated:
//!   its longest strings are cut, `"truncated": true` and `"original_bytes": N` are
//!   added, and if that is still not enough its largest other top-level fields go.
//!
//! An assistant reply is never lost that way: an oversized `item.completed` of an
//! `assistant_message` whose whole text was streamed as the item's `assistant_text`
//! deltas (which are split, never cut) is truncated like any other event but also marked
//! `"text_in_deltas": true`, so a reader knows to take the reply from the deltas
//! ([`StreamedText`] keeps the count).
//!
//! Sizes are always of the serialized JSON, so escaping (`"` → `\"`, control characters
//! → `\u00XX`) is accounted for.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Map, Value, json};

/// The manager's default `max_payload_bytes`, assumed until a welcome says otherwise.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// The smallest limit honoured: below it not even a truncation marker fits.
const MIN_PAYLOAD_BYTES: usize = 1024;
/// Room a delta piece needs at the least: the longest escape (`\u00XX`) is 6 bytes.
const MIN_DELTA_PIECE_BYTES: usize = 16;
/// A truncation leaves strings up to this long (escaped) whole and cuts none shorter:
/// ids, kinds and names stay intact when the bulk is not text.
const KEPT_STRING_BYTES: usize = 256;
/// Top-level fields a truncation keeps to the end: the ones event validation requires
/// (item, kind, message, turn, state, request), and the marker itself.
const KEPT_FIELDS: &[&str] = &[
    "item_id",
    "kind",
    "delta",
    "message",
    "turn_id",
    "state",
    "request_id",
    "truncated",
    "original_bytes",
    "text_in_deltas",
];

/// The largest event payload the manager accepts, as the last `Welcome` said; shared by
/// the connection (which updates it) and every run's outbox (which obeys it).
#[derive(Debug, Clone)]
pub struct PayloadLimit(Arc<AtomicUsize>);

impl Default for PayloadLimit {
    fn default() -> Self {
        Self(Arc::new(AtomicUsize::new(DEFAULT_MAX_PAYLOAD_BYTES)))
    }
}

impl PayloadLimit {
    /// The limit in bytes of serialized JSON.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    /// Takes the limit a welcome names; 0 (a manager that does not say) keeps the default.
    pub fn set_from_welcome(&self, max_payload_bytes: i32) {
        let bytes = match usize::try_from(max_payload_bytes) {
            Ok(0) | Err(_) => DEFAULT_MAX_PAYLOAD_BYTES,
            Ok(bytes) => bytes.max(MIN_PAYLOAD_BYTES),
        };
        self.0.store(bytes, Ordering::Relaxed);
    }
}

/// Bytes of `assistant_text` streamed so far per open item, to tell whether an
/// `item.completed` holds text that its deltas carry too.
#[derive(Debug, Default)]
pub struct StreamedText {
    /// Bytes per item, but for the item counted last.
    items: HashMap<String, usize>,
    /// The item counted last and its bytes: a streamed reply's deltas all name one item,
    /// so most deltas are counted without hashing its id.
    last: Option<(String, usize)>,
}

impl StreamedText {
    /// Counts `bytes` of a delta of `kind` streamed into `item` (only `assistant_text`
    /// counts).
    pub fn count(&mut self, item: &str, kind: &str, bytes: usize) {
        if kind != "assistant_text" {
            return;
        }
        if let Some((last, streamed)) = &mut self.last
            && last == item
        {
            *streamed += bytes;
            return;
        }
        self.settle_last();
        let before = self.items.remove(item).unwrap_or(0);
        self.last = Some((item.to_owned(), before + bytes));
    }

    /// The bytes streamed into `item`, which is forgotten.
    fn take(&mut self, item: &str) -> Option<usize> {
        self.settle_last();
        self.items.remove(item)
    }

    fn settle_last(&mut self) {
        if let Some((item, streamed)) = self.last.take() {
            self.items.insert(item, streamed);
        }
    }

    /// Counts the text of an `assistant_text` delta; marks an `assistant_message`
    /// `item.completed` over `max_bytes` whose text was all streamed
    /// `"text_in_deltas": true` (and forgets the item).
    pub fn observe(&mut self, event_type: &str, payload: &mut Value, max_bytes: usize) {
        match event_type {
            "content.delta" => {
                if let (Some(item), Some(kind), Some(delta)) = (
                    payload["item_id"].as_str(),
                    payload["kind"].as_str(),
                    payload["delta"].as_str(),
                ) {
                    self.count(item, kind, delta.len());
                }
            }
            "item.completed" => {
                let Some(item) = payload["item_id"].as_str() else {
                    return;
                };
                let streamed = self.take(item);
                if payload["kind"] == "assistant_message"
                    && let Some(text) = payload["text"].as_str()
                    // All of it streamed: as much, or more when the provider kept only
                    // the first `MAX_REPLY_BYTES` (`provider::ReplyText`).
                    && streamed.is_some_and(|streamed| streamed >= text.len())
                    && payload.to_string().len() > max_bytes.max(MIN_PAYLOAD_BYTES)
                {
                    payload["text_in_deltas"] = Value::Bool(true);
                }
            }
            _ => {}
        }
    }
}

/// A `content.delta` payload as JSON text, as [`fit`] writes its `Value` (keys in
/// order), built from its fields directly.
pub fn delta_text(item_id: &str, kind: &str, delta: &str) -> String {
    let mut out = String::with_capacity(item_id.len() + kind.len() + delta.len() + 32);
    for (i, (key, value)) in [("delta", delta), ("item_id", item_id), ("kind", kind)]
        .into_iter()
        .enumerate()
    {
        out.push_str(if i == 0 { "{\"" } else { ",\"" });
        out.push_str(key);
        out.push_str("\":");
        push_json_string(&mut out, value);
    }
    out.push('}');
    out
}

/// `value` as a JSON string, as serde_json writes it. Most need no escape (serde_json
/// escapes only `"`, `\` and control characters) and are copied as they are.
fn push_json_string(out: &mut String, value: &str) {
    if value.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(&serde_json::to_string(value).expect("a string always serializes"));
    } else {
        out.push('"');
        out.push_str(value);
        out.push('"');
    }
}

/// The serialized payloads of `payload` made to fit `max_bytes`: itself if it fits,
/// several for a split `content.delta`, one truncated payload otherwise.
pub fn fit(event_type: &str, payload: Value, max_bytes: usize) -> Vec<String> {
    let max_bytes = max_bytes.max(MIN_PAYLOAD_BYTES);
    let text = agentrun_shared::payload::to_text(&payload);
    if text.len() <= max_bytes {
        return vec![text];
    }
    if event_type == "content.delta"
        && let Some(pieces) = split_delta(&payload, max_bytes)
    {
        tracing::debug!(
            bytes = text.len(),
            pieces = pieces.len(),
            "split an oversized content.delta"
        );
        return pieces;
    }
    tracing::warn!(
        event_type,
        bytes = text.len(),
        max_bytes,
        "truncated an event over the payload limit"
    );
    vec![truncate(payload, text.len(), max_bytes)]
}

/// Bytes `c` takes inside a JSON string as serde_json writes it.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\u{08}' | '\t' | '\n' | '\u{0C}' | '\r' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The byte length of the longest prefix of `text` whose escaped form is at most `budget`.
fn prefix_within(text: &str, budget: usize) -> usize {
    let mut used = 0;
    for (i, c) in text.char_indices() {
        used += escaped_len(c);
        if used > budget {
            return i;
        }
    }
    text.len()
}

/// `payload` (a `content.delta` with a string `delta`) as several payloads that each fit,
/// or `None` if its other fields leave no room for text.
fn split_delta(payload: &Value, max_bytes: usize) -> Option<Vec<String>> {
    let Value::Object(fields) = payload else {
        return None;
    };
    let Some(Value::String(delta)) = fields.get("delta") else {
        return None;
    };
    let mut frame: Map<String, Value> = fields
        .iter()
        .filter(|(key, _)| key.as_str() != "delta")
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    frame.insert("delta".into(), Value::String(String::new()));
    let mut frame = Value::Object(frame);
    // Where the delta's text goes does not change the size: frame + escaped piece.
    let budget = max_bytes.checked_sub(frame.to_string().len())?;
    if budget < MIN_DELTA_PIECE_BYTES {
        return None;
    }
    let mut pieces = Vec::new();
    let mut rest = delta.as_str();
    while !rest.is_empty() {
        let cut = prefix_within(rest, budget);
        let (piece, tail) = rest.split_at(cut);
        frame["delta"] = Value::String(piece.to_owned());
        let text = frame.to_string();
        debug_assert!(text.len() <= max_bytes, "a delta piece over the limit");
        pieces.push(text);
        rest = tail;
    }
    Some(pieces)
}

/// One step into a JSON value.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn at_mut<'v>(value: &'v mut Value, path: &[Step]) -> Option<&'v mut Value> {
    path.iter().try_fold(value, |value, step| match step {
        Step::Key(key) => value.get_mut(key.as_str()),
        Step::Index(i) => value.get_mut(*i),
    })
}

/// Every string in `value`, as (escaped length, path).
fn strings(value: &Value, path: &mut Vec<Step>, out: &mut Vec<(usize, Vec<Step>)>) {
    match value {
        Value::String(text) => out.push((text.chars().map(escaped_len).sum(), path.clone())),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Step::Index(i));
                strings(item, path, out);
                path.pop();
            }
        }
        Value::Object(fields) => {
            for (key, field) in fields {
                path.push(Step::Key(key.clone()));
                strings(field, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// `payload` (serialized `original` bytes long) cut down to `max_bytes`, marked
/// `"truncated": true, "original_bytes": original`.
fn truncate(payload: Value, original: usize, max_bytes: usize) -> String {
    let mut payload = match payload {
        Value::Object(fields) => Value::Object(fields),
        _ => Value::Object(Map::new()),
    };
    payload["truncated"] = Value::Bool(true);
    payload["original_bytes"] = Value::from(original);

    // Cut the longest strings first, each by what is still too much (short ones stay).
    let mut excess = payload.to_string().len().saturating_sub(max_bytes);
    let mut found = Vec::new();
    strings(&payload, &mut Vec::new(), &mut found);
    found.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
    for (len, path) in found {
        if excess == 0 {
            break;
        }
        if len <= KEPT_STRING_BYTES {
            break;
        }
        if let Some(Value::String(text)) = at_mut(&mut payload, &path) {
            let cut = prefix_within(text, len.saturating_sub(excess).max(KEPT_STRING_BYTES));
            let kept: usize = text[..cut].chars().map(escaped_len).sum();
            text.truncate(cut);
            excess = excess.saturating_sub(len - kept);
        }
    }

    // Still too large (numbers, nesting): drop the largest other top-level fields.
    let mut text = payload.to_string();
    if let Value::Object(fields) = &mut payload {
        let mut droppable: Vec<(usize, String)> = fields
            .iter()
            .filter(|(key, _)| !KEPT_FIELDS.contains(&key.as_str()))
            .map(|(key, value)| (value.to_string().len(), key.clone()))
            .collect();
        droppable.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        for (_, key) in droppable {
            if text.len() <= max_bytes {
                break;
            }
            fields.remove(&key);
            // A map of JSON values with string keys always serializes.
            text = serde_json::to_string(&*fields).expect("a JSON object serializes");
        }
    }
    if text.len() > max_bytes {
        // Only a kept field that is not text can be this large: keep just the marker.
        text = json!({"truncated": true, "original_bytes": original}).to_string();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(texts: &[String]) -> Vec<Value> {
        texts
            .iter()
            .map(|t| serde_json::from_str(t).unwrap())
            .collect()
    }

    #[test]
    fn a_delta_written_from_its_fields_is_the_text_of_its_value() {
        for (item_id, kind, delta) in [
            ("turn:1", "assistant_text", " token"),
            ("i\"d", "command_output", "line\n\t\u{1}é\\ \u{7f}"),
            ("i:1", "k\\", "plain"),
            ("", "", ""),
        ] {
            let value = serde_json::json!({"item_id": item_id, "kind": kind, "delta": delta});
            assert_eq!(
                delta_text(item_id, kind, delta),
                agentrun_shared::payload::to_text(&value)
            );
        }
    }

    #[test]
    fn escaped_len_matches_serde_json() {
        let text: String = (0u32..0x80)
            .filter_map(char::from_u32)
            .chain("é€𝄞\u{2028}".chars())
            .collect();
        let serialized = Value::String(text.clone()).to_string();
        assert_eq!(
            text.chars().map(escaped_len).sum::<usize>(),
            serialized.len() - 2
        );
    }

    #[test]
    fn a_payload_that_fits_is_left_alone() {
        let payload = json!({"item_id": "a", "kind": "assistant_text", "delta": "hi"});
        assert_eq!(
            fit("content.delta", payload.clone(), 2048),
            [payload.to_string()]
        );
    }

    #[test]
    fn an_oversized_delta_is_split_into_pieces_that_fit_and_reassemble() {
        // Quotes and backslashes double when escaped, control characters become six
        // bytes, and multi-byte characters must not be cut in half.
        let delta = "a\"b\\c\u{01}é€𝄞\n".repeat(2_000);
        let payload = json!({"item_id": "out", "kind": "command_output", "delta": delta});
        let max = 4_096;
        let pieces = fit("content.delta", payload.clone(), max);
        assert!(pieces.len() > 1);
        assert!(pieces.iter().all(|p| p.len() <= max), "every piece fits");
        // Pieces are filled: all but the last are close to the limit.
        assert!(pieces[..pieces.len() - 1].iter().all(|p| p.len() > max - 8));
        let parsed = parsed(&pieces);
        let mut text = String::new();
        for piece in &parsed {
            assert_eq!(piece["item_id"], "out");
            assert_eq!(piece["kind"], "command_output");
            text.push_str(piece["delta"].as_str().unwrap());
        }
        assert_eq!(text, delta);
    }

    #[test]
    fn a_delta_whose_other_fields_are_too_large_is_truncated() {
        let payload = json!({"kind": "assistant_text", "delta": "x".repeat(3_000),
            "extra": "y".repeat(5_000)});
        let pieces = fit("content.delta", payload, 2_048);
        assert_eq!(pieces.len(), 1);
        assert!(pieces[0].len() <= 2_048);
        let p = &parsed(&pieces)[0];
        assert_eq!(p["truncated"], true);
        assert_eq!(p["kind"], "assistant_text");
        assert!(p["delta"].is_string());
    }

    #[test]
    fn another_event_has_its_longest_string_cut_and_is_marked() {
        let message = "€".repeat(10_000);
        let payload = json!({"message": message, "detail": {"note": "short"}});
        let original = payload.to_string().len();
        let pieces = fit("runtime.warning", payload, 4_096);
        assert_eq!(pieces.len(), 1);
        assert!(pieces[0].len() <= 4_096);
        let p = &parsed(&pieces)[0];
        assert_eq!(p["truncated"], true);
        assert_eq!(p["original_bytes"], original);
        assert_eq!(p["detail"]["note"], "short", "short strings are kept");
        let kept = p["message"].as_str().unwrap();
        assert!(
            message.starts_with(kept) && kept.len() > 3_000,
            "{}",
            kept.len()
        );
    }

    #[test]
    fn several_long_strings_are_cut_until_the_event_fits() {
        let payload = json!({"item_id": "i", "kind": "tool_call",
            "args": ["\"".repeat(3_000), "b".repeat(2_500)], "output": "c".repeat(2_000)});
        let pieces = fit("item.completed", payload, 2_048);
        assert!(pieces[0].len() <= 2_048, "{}", pieces[0].len());
        let p = &parsed(&pieces)[0];
        assert_eq!(
            (p["item_id"].as_str(), p["kind"].as_str()),
            (Some("i"), Some("tool_call"))
        );
        assert_eq!(p["truncated"], true);
    }

    #[test]
    fn bulk_that_is_not_text_is_dropped_keeping_the_required_fields() {
        let numbers: Vec<u32> = (0..5_000).collect();
        let payload = json!({"item_id": "i", "kind": "k", "numbers": numbers});
        let pieces = fit("item.updated", payload, 2_048);
        assert!(pieces[0].len() <= 2_048);
        let p = &parsed(&pieces)[0];
        assert_eq!(p["item_id"], "i");
        assert!(p.get("numbers").is_none());
        assert_eq!(p["truncated"], true);
    }

    #[test]
    fn the_limit_follows_the_welcome_with_a_safe_default() {
        let limit = PayloadLimit::default();
        assert_eq!(limit.get(), DEFAULT_MAX_PAYLOAD_BYTES);
        limit.set_from_welcome(100_000);
        assert_eq!(limit.get(), 100_000);
        limit.set_from_welcome(0);
        assert_eq!(limit.get(), DEFAULT_MAX_PAYLOAD_BYTES);
        limit.set_from_welcome(10);
        assert_eq!(limit.get(), MIN_PAYLOAD_BYTES);
    }

    #[test]
    fn many_short_strings_are_dropped_with_their_field() {
        let lines: Vec<String> = (0..100).map(|i| format!("{i:0>100}")).collect();
        let payload = json!({"item_id": "i", "kind": "k", "lines": lines});
        let pieces = fit("item.completed", payload, 2_048);
        let p = &parsed(&pieces)[0];
        assert!(pieces[0].len() <= 2_048);
        assert_eq!(
            (p["item_id"].as_str(), p["kind"].as_str()),
            (Some("i"), Some("k"))
        );
        assert!(p.get("lines").is_none());
    }

    #[test]
    fn when_nothing_else_helps_only_the_marker_is_left() {
        let numbers: Vec<u32> = (0..5_000).collect();
        let payload = json!({"kind": numbers});
        let original = payload.to_string().len();
        let pieces = fit("item.updated", payload, 2_048);
        assert_eq!(
            parsed(&pieces)[0],
            json!({"truncated": true, "original_bytes": original})
        );
    }

    #[test]
    fn an_oversized_streamed_reply_says_its_text_is_in_the_deltas() {
        let max = 2048;
        let mut streamed = StreamedText::default();
        let text = "word ".repeat(1000);
        for piece in [&text[..3000], &text[3000..]] {
            let mut delta = json!({"item_id": "a", "kind": "assistant_text", "delta": piece});
            streamed.observe("content.delta", &mut delta, max);
        }
        let mut done = json!({"item_id": "a", "kind": "assistant_message", "text": text});
        streamed.observe("item.completed", &mut done, max);
        assert_eq!(done["text_in_deltas"], true);
        let fitted = fit("item.completed", done, max);
        let fitted: Value = serde_json::from_str(&fitted[0]).unwrap();
        assert_eq!(fitted["item_id"], "a");
        assert_eq!(fitted["text_in_deltas"], true);
        assert_eq!(fitted["truncated"], true);
        // A reply the provider kept only the start of (its deltas carried more).
        let mut long = json!({"item_id": "d", "kind": "assistant_text", "delta": text.repeat(2)});
        streamed.observe("content.delta", &mut long, max);
        let mut done = json!({"item_id": "d", "kind": "assistant_message", "text": text});
        streamed.observe("item.completed", &mut done, max);
        assert_eq!(done["text_in_deltas"], true);

        // Text that was not all streamed (or a reply that fits) is not marked.
        let mut partial = json!({"item_id": "b", "kind": "assistant_text", "delta": "wo"});
        streamed.observe("content.delta", &mut partial, max);
        let mut done = json!({"item_id": "b", "kind": "assistant_message", "text": text});
        streamed.observe("item.completed", &mut done, max);
        assert!(done.get("text_in_deltas").is_none());
        let mut small = json!({"item_id": "c", "kind": "assistant_text", "delta": "hi"});
        streamed.observe("content.delta", &mut small, max);
        let mut done = json!({"item_id": "c", "kind": "assistant_message", "text": "hi"});
        streamed.observe("item.completed", &mut done, max);
        assert!(done.get("text_in_deltas").is_none());
    }

    #[test]
    fn text_streamed_into_interleaved_items_is_counted_per_item() {
        let max = 2048;
        let text = "word ".repeat(1000);
        let mut streamed = StreamedText::default();
        // Item a's text in two halves with item b's in between, b completed first.
        for (item, piece) in [("a", &text[..2500]), ("b", &text[..]), ("a", &text[2500..])] {
            streamed.count(item, "assistant_text", piece.len());
        }
        streamed.count("a", "reasoning_text", 7);
        for item in ["b", "a"] {
            let mut done = json!({"item_id": item, "kind": "assistant_message", "text": text});
            streamed.observe("item.completed", &mut done, max);
            assert_eq!(done["text_in_deltas"], true, "item {item}");
        }
        // Completing an item forgets it.
        let mut again = json!({"item_id": "a", "kind": "assistant_message", "text": text});
        streamed.observe("item.completed", &mut again, max);
        assert!(again.get("text_in_deltas").is_none());
    }
}
