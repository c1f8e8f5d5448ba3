//! JSON payload validation (must be an object, size-limited) and secret redaction.
//!
//! Everything a client or runner sends as `*_json` passes through [`parse_object`] at the
//! edge; everything stored in the event log passes through [`redact`] first, so a
//! provider echoing a key never lands it in the database.

use serde_json::{Map, Value};

use crate::error::FieldError;

/// Default limit for one JSON payload (event, command, run input).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// What replaces a secret.
pub const REDACTED: &str = "[REDACTED]";

/// Parses `text` as a JSON object of at most `max_bytes`. Empty text is an empty object.
pub fn parse_object(
    field: &str,
    text: &str,
    max_bytes: usize,
) -> Result<Map<String, Value>, FieldError> {
    if text.len() > max_bytes {
        return Err(FieldError::new(
            field,
            format!(
                "is {} bytes, more than the limit of {max_bytes}",
                text.len()
            ),
        ));
    }
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(FieldError::new(field, "must be a JSON object")),
        Err(err) => Err(FieldError::new(field, format!("is not valid JSON ({err})"))),
    }
}

/// Object keys whose values are always secrets (compared case-insensitively, with `-`
/// read as `_`).
const SECRET_KEYS: &[&str] = &[
    "api_key",
    "apikey",
    "authorization",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "access_token",
    "refresh_token",
    "id_token",
    "token",
    "private_key",
    "x_api_key",
    "cookie",
    "set_cookie",
];

/// Prefixes of well-known credential formats found inside free text.
const SECRET_PREFIXES: &[&str] = &[
    "sk-",
    "ghp_",
    "gho_",
    "github_pat_",
    "xoxb-",
    "xoxp-",
    "AKIA",
    "Bearer ",
];

/// Replaces secrets in place: values under secret-named keys, and credential-shaped
/// tokens inside strings. Returns whether anything was redacted.
pub fn redact(value: &mut Value) -> bool {
    match value {
        Value::Object(map) => {
            let mut changed = false;
            for (key, v) in map.iter_mut() {
                if is_secret_key(key) && !v.is_null() && v.as_str() != Some(REDACTED) {
                    *v = Value::String(REDACTED.to_owned());
                    changed = true;
                } else {
                    changed |= redact(v);
                }
            }
            changed
        }
        Value::Array(items) => items.iter_mut().fold(false, |acc, v| redact(v) | acc),
        Value::String(text) => match redact_text(text) {
            Some(clean) => {
                *text = clean;
                true
            }
            None => false,
        },
        _ => false,
    }
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase().replace('-', "_");
    SECRET_KEYS.contains(&key.as_str())
}

/// Minimum length of the token after a prefix for it to count as a credential; short
/// matches ("sk-1", "Bearer of bad news") are ordinary prose.
const MIN_SECRET_BODY: usize = 16;

/// Returns `text` with credential-shaped tokens replaced, or `None` if it has none.
fn redact_text(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = text;
    let mut changed = false;
    while let Some((at, prefix)) = SECRET_PREFIXES
        .iter()
        .filter_map(|p| rest.find(p).map(|at| (at, *p)))
        .min_by_key(|(at, _)| *at)
    {
        let body_start = at + prefix.len();
        let body_len = rest[body_start..]
            .find(|c: char| {
                !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '+' | '='))
            })
            .unwrap_or(rest.len() - body_start);
        out.push_str(&rest[..at]);
        if body_len >= MIN_SECRET_BODY {
            out.push_str(REDACTED);
            changed = true;
        } else {
            out.push_str(&rest[at..body_start + body_len]);
        }
        rest = &rest[body_start + body_len..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parse_object_names_the_field_and_the_problem() {
        assert!(parse_object("input_json", "", 10).unwrap().is_empty());
        let err = parse_object("input_json", "[1]", 100).unwrap_err();
        assert_eq!(err.to_string(), "invalid input_json: must be a JSON object");
        let err = parse_object("input_json", "{nope", 100).unwrap_err();
        assert!(err.reason.starts_with("is not valid JSON"), "{err}");
        let err = parse_object(
            "payload_json",
            &format!("{{\"a\":\"{}\"}}", "x".repeat(100)),
            50,
        )
        .unwrap_err();
        assert!(err.reason.contains("limit of 50"), "{err}");
    }

    #[test]
    fn redacts_secret_keys_and_tokens_but_not_usage() {
        let mut v = json!({
            "api_key": "abc",
            "headers": {"Authorization": "Bearer xyz", "X-Api-Key": "k"},
            "text": "my key is sk-abcdefghijklmnopqrstuvwxyz, ok",
            "usage": {"input_tokens": 12, "output_tokens": 3},
            "note": "sk-1 is short",
        });
        assert!(redact(&mut v));
        assert_eq!(v["api_key"], REDACTED);
        assert_eq!(v["headers"]["Authorization"], REDACTED);
        assert_eq!(v["headers"]["X-Api-Key"], REDACTED);
        assert_eq!(v["text"], "my key is [REDACTED], ok");
        assert_eq!(v["usage"]["input_tokens"], 12);
        assert_eq!(v["note"], "sk-1 is short");
        assert!(!redact(&mut v), "redaction is idempotent");
    }
}
