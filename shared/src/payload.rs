//! JSON payload validation (must be an object, size-limited, no NUL characters) and secret
//! redaction.
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

/// How a payload over its size limit is described, by [`parse_object`] and
/// [`is_too_large`].
const TOO_LARGE: &str = "more than the limit of";

/// Whether `err` is [`parse_object`] refusing a payload over its size limit.
pub fn is_too_large(err: &FieldError) -> bool {
    err.field.ends_with("_json") && err.reason.contains(TOO_LARGE)
}

/// Parses `text` as a JSON object of at most `max_bytes`. Empty text is an empty object.
/// A NUL character (U+0000) in any string or key is refused, naming its path when it can
/// (`input_json.a.b[2]`).
pub fn parse_object(
    field: &str,
    text: &str,
    max_bytes: usize,
) -> Result<Map<String, Value>, FieldError> {
    if text.len() > max_bytes {
        return Err(FieldError::new(
            field,
            format!("is {} bytes, {TOO_LARGE} {max_bytes}", text.len()),
        ));
    }
    if text.trim().is_empty() {
        return Ok(Map::new());
    }
    let map = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(FieldError::new(field, "must be a JSON object")),
        Err(err) => {
            return Err(FieldError::new(field, format!("is not valid JSON ({err})")));
        }
    };
    // PostgreSQL stores no U+0000 in jsonb (nor in text): refuse it here, by path, rather
    // than fail the write later.
    if let Some(nul) = map.iter().find_map(|(k, v)| Nul::in_entry(k, v)) {
        return Err(FieldError::new(
            format!("{field}{}", nul.path),
            nul.reason(),
        ));
    }
    Ok(map)
}

/// What [`parse_object`] says about a NUL character.
pub const NUL_REASON: &str = "must not contain a NUL character (U+0000)";

/// Where a NUL character is in a JSON value: the path to it below the payload
/// (`.a.b[2]`), and whether it is in a key of the object the path names.
struct Nul {
    path: String,
    in_key: bool,
}

impl Nul {
    fn reason(&self) -> &'static str {
        if self.in_key {
            "must not have a key containing a NUL character (U+0000)"
        } else {
            NUL_REASON
        }
    }

    /// The first NUL in one object entry.
    fn in_entry(key: &str, value: &Value) -> Option<Nul> {
        if key.contains('\0') {
            return Some(Nul {
                path: String::new(),
                in_key: true,
            });
        }
        let mut nul = Nul::in_value(value)?;
        match path_segment(key) {
            Some(segment) => nul.path.insert_str(0, &segment),
            // A key too odd to name: the path stops at the object holding it.
            None => nul.path.clear(),
        }
        Some(nul)
    }

    /// The first NUL in `value`, at any depth (serde_json bounds the depth).
    fn in_value(value: &Value) -> Option<Nul> {
        match value {
            Value::String(s) => s.contains('\0').then(|| Nul {
                path: String::new(),
                in_key: false,
            }),
            Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| {
                let mut nul = Nul::in_value(v)?;
                nul.path.insert_str(0, &format!("[{i}]"));
                Some(nul)
            }),
            Value::Object(map) => map.iter().find_map(|(k, v)| Nul::in_entry(k, v)),
            _ => None,
        }
    }
}

/// `.key` for a short key of word characters; `None` for any other, which would make a
/// long or ambiguous field name.
fn path_segment(key: &str) -> Option<String> {
    let plain = !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    plain.then(|| format!(".{key}"))
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
///
/// Every character position is tried, so a credential starting inside a short match is
/// still found ("Bearer Bearer <token>", "sk-1Bearer <token>"); a redacted credential is
/// skipped whole. Linear in the text: a short match reads fewer than
/// [`MIN_SECRET_BODY`] token characters.
fn redact_text(text: &str) -> Option<String> {
    let mut out = String::new();
    // `text[..copied]` is in `out`, or was replaced there.
    let mut copied = 0;
    let mut at = 0;
    while let Some(c) = text[at..].chars().next() {
        match credential_len(&text[at..]) {
            Some(len) => {
                out.push_str(&text[copied..at]);
                out.push_str(REDACTED);
                at += len;
                copied = at;
            }
            None => at += c.len_utf8(),
        }
    }
    if copied == 0 {
        return None;
    }
    out.push_str(&text[copied..]);
    Some(out)
}

/// The length of the credential `text` starts with: a known prefix followed by at least
/// [`MIN_SECRET_BODY`] token characters.
fn credential_len(text: &str) -> Option<usize> {
    SECRET_PREFIXES.iter().find_map(|prefix| {
        let body = text.strip_prefix(prefix)?;
        let len = body
            .find(|c: char| {
                !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '+' | '='))
            })
            .unwrap_or(body.len());
        (len >= MIN_SECRET_BODY).then_some(prefix.len() + len)
    })
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
        assert!(is_too_large(&err));
        assert!(!is_too_large(
            &parse_object("input_json", "[1]", 100).unwrap_err()
        ));
    }

    #[test]
    fn parse_object_refuses_nul_by_path() {
        let field = |text: &str| parse_object("input_json", text, 1000).unwrap_err().field;
        assert_eq!(field(r#"{"prompt": "a\u0000b"}"#), "input_json.prompt");
        assert_eq!(field(r#"{"a": {"b": [1, "\u0000"]}}"#), "input_json.a.b[1]");
        assert_eq!(field(r#"{"a": {"k\u0000": 1}}"#), "input_json.a");
        assert_eq!(field(r#"{"odd key": ["\u0000"]}"#), "input_json");
        let err = parse_object("p", r#"{"a": "\u0000"}"#, 100).unwrap_err();
        assert_eq!(err.reason, NUL_REASON);
        assert!(parse_object("p", r#"{"a": "\\u0000"}"#, 100).is_ok());
    }

    #[test]
    fn credentials_starting_inside_a_short_match_are_redacted() {
        let token = "abcdefghijklmnopqrstuvwxyz";
        for (text, want) in [
            (
                format!("Authorization: Bearer Bearer {token}"),
                format!("Authorization: Bearer {REDACTED}"),
            ),
            (format!("sk-1Bearer {token}"), format!("sk-1{REDACTED}")),
            (format!("AKIAKIA{token}"), REDACTED.to_owned()),
            (format!("é sk-{token} é"), format!("é {REDACTED} é")),
        ] {
            assert_eq!(redact_text(&text).as_deref(), Some(want.as_str()), "{text}");
        }
        assert_eq!(redact_text("Bearer Bearer of bad news, sk-1"), None);
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
