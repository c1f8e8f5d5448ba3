//! The closed set of event types and the payload rules for each.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::FieldError;
use crate::payload::has_credential;

macro_rules! event_types {
    ($($variant:ident = $text:literal),+ $(,)?) => {
        /// An event type. The set is closed: anything else is refused at the edge.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventType { $($variant),+ }

        impl EventType {
            pub const ALL: &'static [EventType] = &[$(EventType::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $(EventType::$variant => $text),+ }
            }

            pub fn parse(field: &str, text: &str) -> Result<Self, FieldError> {
                match text {
                    $($text => Ok(EventType::$variant),)+
                    "" => Err(FieldError::new(field, "is required")),
                    _ => Err(FieldError::new(field, format!("unknown event type {text:?}"))),
                }
            }
        }
    };
}

event_types! {
    RunCreated = "run.created",
    RunClaimed = "run.claimed",
    RunStarted = "run.started",
    RunRequeued = "run.requeued",
    RunTerminal = "run.terminal",
    CommandCreated = "command.created",
    CommandDelivered = "command.delivered",
    CommandCompleted = "command.completed",
    TurnStarted = "turn.started",
    TurnCompleted = "turn.completed",
    ItemStarted = "item.started",
    ItemUpdated = "item.updated",
    ItemCompleted = "item.completed",
    ContentDelta = "content.delta",
    PlanUpdated = "plan.updated",
    DiffUpdated = "diff.updated",
    UsageUpdated = "usage.updated",
    RequestOpened = "request.opened",
    RequestResolved = "request.resolved",
    RuntimeWarning = "runtime.warning",
    RuntimeError = "runtime.error",
}

/// States a `turn.completed` event may report.
/// `blocked`: a person declined to let the turn go on (a human gate); the run ends
/// `blocked`.
pub const TURN_END_STATES: &[&str] =
    &["completed", "failed", "interrupted", "cancelled", "blocked"];

/// Kinds of approval or input a `request.opened` event may ask for.
pub const REQUEST_KINDS: &[&str] = &["command", "file_read", "file_change", "tool", "user_input"];

impl EventType {
    /// Run and command lifecycle events are the manager's alone; a runner reports those
    /// through FinishRun and command updates, so the log cannot contradict the run row.
    /// `request.resolved` too: a request is resolved by a client (ResolveRequest), the
    /// turn or run ending, or its deadline — all recorded by the manager.
    pub fn runner_may_write(self) -> bool {
        !matches!(
            self,
            EventType::RunCreated
                | EventType::RunClaimed
                | EventType::RunStarted
                | EventType::RunRequeued
                | EventType::RunTerminal
                | EventType::CommandCreated
                | EventType::CommandDelivered
                | EventType::CommandCompleted
                | EventType::RequestResolved
        )
    }

    /// Checks the fields this type requires. `field` prefixes the names in errors
    /// (e.g. `events[3].payload_json`).
    pub fn validate_payload(
        self,
        field: &str,
        payload: &Map<String, Value>,
    ) -> Result<(), FieldError> {
        match self {
            EventType::TurnStarted => require_string(field, payload, "turn_id").map(drop),
            EventType::TurnCompleted => require_one_of(field, payload, "state", TURN_END_STATES),
            EventType::ContentDelta => {
                require_string(field, payload, "kind")?;
                require_string(field, payload, "delta").map(drop)
            }
            EventType::ItemStarted | EventType::ItemUpdated | EventType::ItemCompleted => {
                require_string(field, payload, "item_id")?;
                require_string(field, payload, "kind").map(drop)
            }
            EventType::RequestOpened => validate_request_opened(field, payload),
            EventType::RuntimeWarning | EventType::RuntimeError => {
                require_string(field, payload, "message").map(drop)
            }
            _ => Ok(()),
        }
    }
}

/// Whether `text` is a `content.delta` payload of the usual shape — `kind` and `delta`,
/// maybe `item_id` and `text_in_deltas`, nothing else — that [`crate::payload::parse_object`]
/// and [`EventType::validate_payload`] accept and [`crate::payload::redact`] leaves as
/// it is, at most `max_bytes` long. Read in place, without building a value: streamed
/// deltas are most of what runners send, so such a delta is stored as its text. Anything
/// else is `false`, and takes the general path (which also names what is wrong).
pub fn is_plain_delta(text: &str, max_bytes: usize) -> bool {
    PlainDeltas::default().check(text, max_bytes)
}

/// [`is_plain_delta`] for the deltas of one batch, in order. A streamed reply repeats its
/// `kind` and `item_id` on every delta (most of a delta's text): each is scanned for
/// secrets only when it differs from the last one found clean. The `delta` itself always
/// is.
#[derive(Debug, Default)]
pub struct PlainDeltas {
    /// The last `kind` and `item_id` found clean.
    clean: [String; 2],
}

/// The shape of a plain delta, its strings borrowed from the text (`delta` decoded if it
/// has escapes). A field not named here, or named twice, is not this shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainDelta<'a> {
    kind: &'a str,
    #[serde(borrow)]
    delta: Cow<'a, str>,
    item_id: Option<&'a str>,
    // Only read for its type: the general path accepts any value here, this one a bool.
    #[allow(dead_code)]
    text_in_deltas: Option<bool>,
}

impl PlainDeltas {
    /// Whether `text` is a plain delta ([`is_plain_delta`]).
    pub fn check(&mut self, text: &str, max_bytes: usize) -> bool {
        if text.len() > max_bytes {
            return false;
        }
        if let Some((kind, delta, item_id)) = compact_plain_delta(text) {
            return self.clean(kind, delta, item_id);
        }
        // A struct would also be read from an array.
        if !text.trim_start().starts_with('{') {
            return false;
        }
        let Ok(delta) = serde_json::from_str::<PlainDelta>(text) else {
            return false;
        };
        self.clean(delta.kind, &delta.delta, delta.item_id)
    }

    /// Whether no field holds a NUL or a credential.
    fn clean(&mut self, kind: &str, delta: &str, item_id: Option<&str>) -> bool {
        let clean = |s: &str| !s.contains('\0') && !has_credential(s);
        if !clean(delta) {
            return false;
        }
        for (known, field) in self.clean.iter_mut().zip([Some(kind), item_id]) {
            match field {
                Some(field) if field != known => {
                    if !clean(field) {
                        return false;
                    }
                    known.clear();
                    known.push_str(field);
                }
                _ => {}
            }
        }
        true
    }
}

/// `kind`, `delta` and `item_id` of a plain delta written as runners write one: no
/// whitespace, no escapes, no `text_in_deltas`. `None` for any other text (serde then
/// reads it, and decides): this only ever accepts what serde would, without its
/// per-field machinery, which was a twentieth of the manager's time when streaming.
fn compact_plain_delta(text: &str) -> Option<(&str, &str, Option<&str>)> {
    /// The string `text` starts with, if it has no escape or control character, and
    /// what follows it.
    fn string(text: &str) -> Option<(&str, &str)> {
        let body = text.strip_prefix('"')?;
        let end = body
            .bytes()
            .position(|b| b == b'"' || b == b'\\' || b < 0x20)?;
        (body.as_bytes()[end] == b'"').then(|| (&body[..end], &body[end + 1..]))
    }
    let (mut kind, mut delta, mut item_id) = (None, None, None);
    let mut rest = text.strip_prefix('{')?;
    loop {
        let (key, after) = string(rest)?;
        let (value, after) = string(after.strip_prefix(':')?)?;
        let field = match key {
            "kind" => &mut kind,
            "delta" => &mut delta,
            "item_id" => &mut item_id,
            _ => return None,
        };
        if field.replace(value).is_some() {
            return None; // named twice
        }
        match after {
            "}" => break,
            _ => rest = after.strip_prefix(',')?,
        }
    }
    Some((kind?, delta?, item_id))
}

/// Longest `timeout_ms` a `request.opened` may ask for: a week.
pub const MAX_REQUEST_TIMEOUT_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// `request.opened {request_id: UUID, kind, detail?: object, options?: [string],
/// timeout_ms?: 1..=MAX_REQUEST_TIMEOUT_MS}`.
fn validate_request_opened(field: &str, payload: &Map<String, Value>) -> Result<(), FieldError> {
    let request_id = require_string(field, payload, "request_id")?;
    crate::ids::RequestId::parse(&format!("{field}.request_id"), request_id)?;
    require_one_of(field, payload, "kind", REQUEST_KINDS)?;
    if payload.get("detail").is_some_and(|d| !d.is_object()) {
        return Err(FieldError::new(
            format!("{field}.detail"),
            "must be an object",
        ));
    }
    match payload.get("options") {
        None => {}
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {}
        Some(_) => {
            return Err(FieldError::new(
                format!("{field}.options"),
                "must be an array of strings",
            ));
        }
    }
    match payload.get("timeout_ms") {
        None => Ok(()),
        Some(t)
            if t.as_i64()
                .is_some_and(|t| (1..=MAX_REQUEST_TIMEOUT_MS).contains(&t)) =>
        {
            Ok(())
        }
        Some(_) => Err(FieldError::new(
            format!("{field}.timeout_ms"),
            format!("must be an integer between 1 and {MAX_REQUEST_TIMEOUT_MS}"),
        )),
    }
}

fn require_string<'a>(
    field: &str,
    payload: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a str, FieldError> {
    match payload.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(FieldError::new(
            format!("{field}.{key}"),
            "must be a string",
        )),
        None => Err(FieldError::new(format!("{field}.{key}"), "is required")),
    }
}

fn require_one_of(
    field: &str,
    payload: &Map<String, Value>,
    key: &str,
    allowed: &[&str],
) -> Result<(), FieldError> {
    let value = require_string(field, payload, key)?;
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(FieldError::new(
            format!("{field}.{key}"),
            format!("must be one of {}", allowed.join(", ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn unknown_types_and_missing_fields_are_named() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse("type", t.as_str()).unwrap(), *t);
        }
        let err = EventType::parse("events[0].type", "run.exploded").unwrap_err();
        assert_eq!(err.field, "events[0].type");
        let err = EventType::ContentDelta
            .validate_payload(
                "events[2].payload_json",
                &obj(json!({"kind": "assistant_text"})),
            )
            .unwrap_err();
        assert_eq!(err.field, "events[2].payload_json.delta");
        let err = EventType::TurnCompleted
            .validate_payload("p", &obj(json!({"state": "exploded"})))
            .unwrap_err();
        assert!(err.reason.contains("interrupted"));
        assert!(
            EventType::TurnCompleted
                .validate_payload("p", &obj(json!({"state": "completed"})))
                .is_ok()
        );
    }

    #[test]
    fn a_plain_delta_is_exactly_what_the_general_path_stores_as_sent() {
        let plain = [
            r#"{"item_id":"i:1","kind":"assistant_text","delta":"Hello"}"#,
            r#" {"kind": "reasoning_text", "delta": "line\nbreak \"quoted\" \u00e9"}"#,
            r#"{"kind":"assistant_text","delta":"","text_in_deltas":true,"item_id":"x"}"#,
            // As runners write them (read without serde).
            r#"{"delta":"token","item_id":"i:1","kind":"assistant_text"}"#,
            r#"{"delta":"","kind":"reasoning_text"}"#,
        ];
        let not_plain = [
            r#"{"kind":"assistant_text","delta":"k sk-proj-abcdefghijklmnopqrstuvwxyz0123"}"#,
            r#"{"kind":"assistant_text","delta":"nul \u0000 here"}"#,
            r#"{"kind":"assistant_text","delta":"x","extra":1}"#,
            r#"{"kind":"assistant_text","delta":"x","delta":"y"}"#,
            r#"{"kind":"assistant_text","delta":7}"#,
            r#"{"kind":"assistant_text"}"#,
            r#"{"kind":"assistant_text","delta":"x","text_in_deltas":"yes"}"#,
            r#"{"kind":"assistant_text","delta":"x"} trailing"#,
            r#"["assistant_text","x"]"#,
            "",
            // Compact, as the serde-free reading takes them, and still refused.
            r#"{"delta":"k sk-proj-abcdefghijklmnopqrstuvwxyz0123","kind":"assistant_text"}"#,
            r#"{"delta":"x","delta":"y","kind":"assistant_text"}"#,
            r#"{"delta":"x","kind":"assistant_text","other":"y"}"#,
            "{\"delta\":\"raw\ttab\",\"kind\":\"assistant_text\"}",
            r#"{"delta":"x","kind":"assistant_text"}}"#,
            r#"{"delta":"x","kind":"assistant_text","#,
            r#"{"delta":"x"}"#,
            r#"{"item_id":"i","kind":"assistant_text"}"#,
            r#"{"delta":"x","kind":"assistant_text""#,
        ];
        for text in plain {
            assert!(is_plain_delta(text, 1024), "{text}");
            let mut map = crate::payload::parse_object("p", text, 1024).unwrap();
            EventType::ContentDelta.validate_payload("p", &map).unwrap();
            let mut value = Value::Object(std::mem::take(&mut map));
            assert!(!crate::payload::redact(&mut value), "{text}");
        }
        for text in not_plain {
            assert!(!is_plain_delta(text, 1024), "{text}");
        }
        assert!(
            !is_plain_delta(plain[0], plain[0].len() - 1),
            "over the limit"
        );
        // What the serde-free reading accepts, serde reads as the same fields.
        assert!(compact_plain_delta(plain[3]).is_some() && compact_plain_delta(plain[4]).is_some());
        for text in plain.iter().chain(&not_plain) {
            if let Some((kind, delta, item_id)) = compact_plain_delta(text) {
                let value: Value = serde_json::from_str(text).unwrap();
                assert_eq!(value["kind"].as_str(), Some(kind), "{text}");
                assert_eq!(value["delta"].as_str(), Some(delta), "{text}");
                assert_eq!(value["item_id"].as_str(), item_id, "{text}");
                assert_eq!(
                    value.as_object().unwrap().len(),
                    2 + usize::from(item_id.is_some())
                );
            }
        }
    }

    #[test]
    fn a_batch_of_deltas_is_checked_field_by_field_whatever_came_before() {
        let secret = "sk-proj-abcdefghijklmnopqrstuvwxyz0123";
        let delta = |item_id: &str, kind: &str, text: &str| {
            format!(r#"{{"delta":"{text}","item_id":"{item_id}","kind":"{kind}"}}"#)
        };
        let mut deltas = PlainDeltas::default();
        assert!(deltas.check(&delta("i:1", "assistant_text", "a"), 1024));
        assert!(deltas.check(&delta("i:1", "assistant_text", "b"), 1024));
        // A clean item id and kind seen before do not let a secret through elsewhere.
        assert!(!deltas.check(&delta("i:1", "assistant_text", secret), 1024));
        assert!(!deltas.check(&delta(secret, "assistant_text", "c"), 1024));
        assert!(!deltas.check(&delta("i:1", secret, "c"), 1024));
        // A refused field is not remembered as clean; the clean ones still pass.
        assert!(!deltas.check(&delta(secret, "assistant_text", "d"), 1024));
        assert!(deltas.check(&delta("i:2", "reasoning_text", "e"), 1024));
        assert!(deltas.check(&delta("i:1", "assistant_text", "f"), 1024));
    }

    #[test]
    fn runners_cannot_forge_lifecycle_events() {
        assert!(!EventType::RunTerminal.runner_may_write());
        assert!(!EventType::CommandCompleted.runner_may_write());
        assert!(!EventType::RequestResolved.runner_may_write());
        assert!(EventType::ContentDelta.runner_may_write());
        assert!(EventType::RequestOpened.runner_may_write());
    }

    #[test]
    fn request_opened_needs_a_uuid_and_well_formed_fields() {
        let id = "8a1f3c2e-4b5d-4e6f-9a0b-1c2d3e4f5a6b";
        let check = |v: Value| EventType::RequestOpened.validate_payload("p", &obj(v));
        assert!(check(json!({"request_id": id, "kind": "command"})).is_ok());
        assert!(
            check(
                json!({"request_id": id, "kind": "user_input", "detail": {"q": "name?"},
                         "options": ["accept"], "timeout_ms": 300})
            )
            .is_ok()
        );
        let field = |v: Value| check(v).unwrap_err().field;
        assert_eq!(field(json!({"kind": "command"})), "p.request_id");
        assert_eq!(
            field(json!({"request_id": "nope", "kind": "command"})),
            "p.request_id"
        );
        assert_eq!(field(json!({"request_id": id, "kind": "rm"})), "p.kind");
        assert_eq!(
            field(json!({"request_id": id, "kind": "tool", "detail": "x"})),
            "p.detail"
        );
        assert_eq!(
            field(json!({"request_id": id, "kind": "tool", "options": [1]})),
            "p.options"
        );
        assert_eq!(
            field(json!({"request_id": id, "kind": "tool", "timeout_ms": 0})),
            "p.timeout_ms"
        );
        assert_eq!(
            field(json!({"request_id": id, "kind": "tool", "timeout_ms": "5"})),
            "p.timeout_ms"
        );
    }
}
