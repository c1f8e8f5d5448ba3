//! Fuzzes what the manager does with one runner event before it is stored: the event type
//! and payload checks of `runner_messages::events` (manager) (type in the closed set, writable by runners,
//! payload a JSON object within the size limit, the type's required fields), then
//! `redact`, the gate every stored payload passes.
//!
//! Input: UTF-8 text (gRPC strings are UTF-8, so nothing else reaches the manager), the
//! event type up to the first newline and the payload JSON after it.
//!
//! Properties, beyond "never panics":
//! - validation is deterministic, and an error names a field under `events[0].`;
//! - redaction leaves no value under a secret key and no credential token, keeps the
//!   structure, reports exactly whether it changed anything, and a second pass changes
//!   nothing (the oracle restates the secret key endings and the credential prefixes; the
//!   structural shapes, agentrun API keys, JWTs, PEM blocks and URL passwords, are checked
//!   by `payload::tests::redaction_table` and here only for idempotence and shape);
//! - a payload that passed validation still passes it after redaction (what is stored
//!   obeys the type's rules);
//! - the same redaction properties hold for any JSON value the payload text holds, valid
//!   event or not.
//!
//! The runner_seq and batch-size checks of `runner_messages::events` (manager) are manager code
//! (`manager/src/api/runner_service.rs`) and are not reached from here.

#![no_main]

use agentrun_shared::error::FieldError;
use agentrun_shared::events::EventType;
use agentrun_shared::payload::{DEFAULT_MAX_PAYLOAD_BYTES, REDACTED, parse_object, redact};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// The manager's default limit is 256 KiB; a small one makes the size check reachable.
const MAX_BYTES: usize = 2048;
const _: () = assert!(MAX_BYTES <= DEFAULT_MAX_PAYLOAD_BYTES);

/// The event checks of `runner_messages::events` (manager) for the first event of a batch, in its order.
fn validate(
    event_type: &str,
    payload_json: &str,
) -> Result<(EventType, Map<String, Value>), FieldError> {
    let event_type = EventType::parse("events[0].type", event_type)?;
    if !event_type.runner_may_write() {
        return Err(FieldError::new(
            "events[0].type",
            format!("{} is written by the manager only", event_type.as_str()),
        ));
    }
    let payload = parse_object("events[0].payload_json", payload_json, MAX_BYTES)?;
    event_type.validate_payload("events[0].payload_json", &payload)?;
    Ok((event_type, payload))
}

/// The documented secret key endings (`shared/src/payload.rs`), compared
/// case-insensitively with `-` read as `_`; written out again here so a change to either
/// list shows. A key is secret when it ends with one of these (`OPENAI_API_KEY`, `db_password`), so
/// `input_tokens` and `secret_name` are not.
const SECRET_KEY_ENDINGS: &[&str] = &[
    "apikey",
    "api_key",
    "access_key",
    "secret_key",
    "private_key",
    "authorization",
    "password",
    "passwd",
    "secret",
    "token",
    "cookie",
];

/// The documented credential prefixes, and the shortest token body that counts.
const SECRET_PREFIXES: &[&str] = &[
    "sk-",
    "sk_live_",
    "sk_test_",
    "rk_live_",
    "rk_test_",
    "ghp_",
    "gho_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "AKIA",
    "Bearer ",
    "bearer ",
];
/// Prefixes matched in any case.
const CASELESS_PREFIXES: &[&str] = &["bearer "];
const MIN_SECRET_BODY: usize = 16;

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase().replace('-', "_");
    SECRET_KEY_ENDINGS.iter().any(|ending| key.ends_with(ending))
}

fn body_len(text: &str) -> usize {
    text.find(|c: char| {
        !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '+' | '='))
    })
    .unwrap_or(text.len())
}

/// Every (start, end) of a prefix and the token characters after it.
fn prefix_spans(text: &str) -> Vec<(usize, usize, usize)> {
    let mut spans = Vec::new();
    // ASCII lower-casing keeps every byte offset.
    let lower = text.to_ascii_lowercase();
    let matches = SECRET_PREFIXES
        .iter()
        .flat_map(|prefix| text.match_indices(prefix))
        .chain(
            CASELESS_PREFIXES
                .iter()
                .flat_map(|prefix| lower.match_indices(prefix)),
        );
    for (at, prefix) in matches {
        let body = body_len(&text[at + prefix.len()..]);
        spans.push((at, at + prefix.len() + body, body));
    }
    spans
}

/// Credential tokens left in `text`, including one that starts inside the span of an
/// earlier, short prefix match ("Bearer Bearer <token>").
fn credential_tokens(text: &str) -> Vec<String> {
    prefix_spans(text)
        .into_iter()
        .filter(|(_, _, body)| *body >= MIN_SECRET_BODY)
        .map(|(at, end, _)| text[at..end].to_owned())
        .collect()
}

/// Panics if a secret is left anywhere in `value`.
fn assert_no_secrets(value: &Value, path: &str) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{path}.{k}");
                assert!(
                    !is_secret_key(k) || v.is_null() || v.as_str() == Some(REDACTED),
                    "secret kept at {here}: {v}"
                );
                assert_no_secrets(v, &here);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                assert_no_secrets(v, &format!("{path}[{i}]"));
            }
        }
        Value::String(s) => {
            let left = credential_tokens(s);
            assert!(left.is_empty(), "credential kept at {path}: {left:?}");
        }
        _ => {}
    }
}

/// Same keys and array lengths everywhere; only leaf values (or a secret key's whole
/// value) may differ.
fn same_shape(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter().all(|(k, v)| {
                    y.get(k).is_some_and(|w| {
                        (is_secret_key(k) && w.as_str() == Some(REDACTED)) || same_shape(v, w)
                    })
                })
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_shape(v, w))
        }
        (Value::String(_), Value::String(_)) => true,
        (x, y) => x == y,
    }
}

/// Redacts `value` and checks every redaction property; returns the redacted value.
fn check_redaction(value: &Value) -> Value {
    let mut redacted = value.clone();
    let changed = redact(&mut redacted);
    assert_eq!(changed, &redacted != value, "redact misreports a change");
    assert_no_secrets(&redacted, "$");
    assert!(same_shape(value, &redacted), "{value} became {redacted}");
    let mut twice = redacted.clone();
    assert!(!redact(&mut twice), "a second pass changed {redacted}");
    assert_eq!(twice, redacted);
    redacted
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (event_type, payload_json) = text.split_once('\n').unwrap_or((text, ""));

    let first = validate(event_type, payload_json);
    assert_eq!(
        first,
        validate(event_type, payload_json),
        "validation is not deterministic"
    );
    match first {
        Err(err) => {
            assert!(err.field.starts_with("events[0]."), "{err}");
            assert!(!err.reason.is_empty(), "{err}");
        }
        Ok((event_type, payload)) => {
            let redacted = check_redaction(&Value::Object(payload));
            let stored = redacted.as_object().expect("redaction keeps an object");
            if let Err(err) = event_type.validate_payload("p", stored) {
                panic!("valid before redaction, not after: {err} ({redacted})");
            }
        }
    }

    // Any JSON at all: the redaction properties hold whatever the value.
    if payload_json.len() <= MAX_BYTES
        && let Ok(value) = serde_json::from_str::<Value>(payload_json)
    {
        check_redaction(&value);
    }
});
