//! Input rules shared by the handlers: names, free text, limits, paging.
//!
//! Limits (each refused with INVALID_ARGUMENT naming the field):
//! - a name: at most [`MAX_NAME_LEN`] bytes, no spaces or control characters;
//! - a list in a request (labels, backend profiles, queues, project ids, statuses): at
//!   most [`MAX_LIST_LEN`] entries;
//! - a timeout (`queue_timeout_ms`, `run_timeout_ms`): at most [`MAX_TIMEOUT_MS`], 30 days;
//! - free text (reasons, messages, versions, key names): no NUL character, which
//!   PostgreSQL cannot store in `text` or `jsonb`.

use std::collections::HashSet;
use std::time::SystemTime;

use agentrun_shared::error::FieldError;
use agentrun_shared::payload::NUL_REASON;
use prost_types::Timestamp;

use crate::retention::MAX_RETENTION_MS;

/// Longest name (queue, project, label, backend profile, idempotency key).
pub const MAX_NAME_LEN: usize = 128;

/// Most entries in a list of a request (labels, backend profiles, queues, project ids,
/// statuses).
pub const MAX_LIST_LEN: usize = 64;

/// Longest queue or run timeout: 30 days (and far below what PostgreSQL can add to a
/// timestamp).
pub const MAX_TIMEOUT_MS: i64 = 30 * 24 * 60 * 60 * 1000;

/// A non-empty name of printable characters without spaces, at most [`MAX_NAME_LEN`].
pub fn name<'a>(field: &str, text: &'a str) -> Result<&'a str, FieldError> {
    if text.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if text.len() > MAX_NAME_LEN {
        return Err(FieldError::new(
            field,
            format!("is longer than {MAX_NAME_LEN} bytes"),
        ));
    }
    if text.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(FieldError::new(
            field,
            "must not contain spaces or control characters",
        ));
    }
    Ok(text)
}

/// Like [`name`], with a default for the empty string.
pub fn name_or<'a>(field: &str, text: &'a str, default: &'a str) -> Result<&'a str, FieldError> {
    if text.is_empty() {
        Ok(default)
    } else {
        name(field, text)
    }
}

/// An optional name: empty means none.
pub fn optional_name(field: &str, text: &str) -> Result<Option<String>, FieldError> {
    if text.is_empty() {
        Ok(None)
    } else {
        name(field, text).map(|t| Some(t.to_owned()))
    }
}

/// A list of at most [`MAX_LIST_LEN`] entries.
pub fn list_len(field: &str, len: usize) -> Result<(), FieldError> {
    if len > MAX_LIST_LEN {
        Err(FieldError::new(
            field,
            format!("holds {len} entries, more than the limit of {MAX_LIST_LEN}"),
        ))
    } else {
        Ok(())
    }
}

/// A list of at most [`MAX_LIST_LEN`] names, each checked, with duplicates removed (the
/// first kept, in order).
pub fn names(field: &str, items: &[String]) -> Result<Vec<String>, FieldError> {
    list_len(field, items.len())?;
    let mut seen = HashSet::with_capacity(items.len());
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let item = name(&format!("{field}[{i}]"), item)?;
        if seen.insert(item) {
            out.push(item.to_owned());
        }
    }
    Ok(out)
}

/// Free text stored as it is: anything but a NUL character.
pub fn text<'a>(field: &str, value: &'a str) -> Result<&'a str, FieldError> {
    if value.contains('\0') {
        Err(FieldError::new(field, NUL_REASON))
    } else {
        Ok(value)
    }
}

/// Longest concurrency key.
pub const MAX_CONCURRENCY_KEY_BYTES: usize = 256;

/// A concurrency key: empty is none; else at most [`MAX_CONCURRENCY_KEY_BYTES`] of text
/// without control characters.
pub fn concurrency_key<'a>(field: &str, value: &'a str) -> Result<Option<&'a str>, FieldError> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > MAX_CONCURRENCY_KEY_BYTES {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_CONCURRENCY_KEY_BYTES} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(Some(value))
}

/// Free text of at most `max_bytes`.
pub fn short_text<'a>(
    field: &str,
    value: &'a str,
    max_bytes: usize,
) -> Result<&'a str, FieldError> {
    if value.len() > max_bytes {
        return Err(FieldError::new(
            field,
            format!("must be at most {max_bytes} bytes"),
        ));
    }
    text(field, value)
}

/// Any JSON value of at most `max_bytes` (a tool's result): empty text is none. A NUL
/// character anywhere in it is refused, as PostgreSQL cannot store it.
pub fn json_value(
    field: &str,
    text: &str,
    max_bytes: usize,
) -> Result<Option<serde_json::Value>, FieldError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    if text.len() > max_bytes {
        return Err(FieldError::new(
            field,
            format!(
                "is {} bytes, more than the limit of {max_bytes}",
                text.len()
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|err| FieldError::new(field, format!("is not valid JSON ({err})")))?;
    fn has_nul(value: &serde_json::Value) -> bool {
        match value {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().any(has_nul),
            serde_json::Value::Object(map) => {
                map.iter().any(|(k, v)| k.contains('\0') || has_nul(v))
            }
            _ => false,
        }
    }
    if has_nul(&value) {
        return Err(FieldError::new(field, NUL_REASON));
    }
    Ok(Some(value))
}

/// Trims the string at `key` of a JSON object in place: text a person typed (a prompt,
/// a steer) is stored without surrounding whitespace, and one that is nothing but
/// whitespace is refused, as is a value that is not a string.
pub fn trim_text_in(
    object: &mut serde_json::Map<String, serde_json::Value>,
    key: &str,
    field: &str,
) -> Result<(), FieldError> {
    let Some(value) = object.get_mut(key) else {
        return Ok(());
    };
    let serde_json::Value::String(text) = value else {
        return Err(FieldError::new(field, "must be a string"));
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(FieldError::new(
            field,
            "must not be empty or only whitespace",
        ));
    }
    if trimmed.len() != text.len() {
        *text = trimmed.to_owned();
    }
    Ok(())
}

/// An integer in `min..=max`, with `default` for zero.
pub fn bounded(
    field: &str,
    value: i64,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, FieldError> {
    let value = if value == 0 { default } else { value };
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(FieldError::new(
            field,
            format!("must be between {min} and {max}"),
        ))
    }
}

/// A timeout in milliseconds: zero means none, negative or more than [`MAX_TIMEOUT_MS`] is
/// refused.
pub fn timeout_ms(field: &str, value: i64) -> Result<Option<i64>, FieldError> {
    match value {
        0 => Ok(None),
        v if v < 0 => Err(FieldError::new(field, "must not be negative")),
        v if v > MAX_TIMEOUT_MS => Err(FieldError::new(
            field,
            format!("must be at most {MAX_TIMEOUT_MS} (30 days)"),
        )),
        v => Ok(Some(v)),
    }
}

/// A retention in milliseconds: 0 (forever) up to [`MAX_RETENTION_MS`].
pub fn retention_ms(field: &str, value: i64) -> Result<i64, FieldError> {
    if (0..=MAX_RETENTION_MS).contains(&value) {
        Ok(value)
    } else {
        Err(FieldError::new(
            field,
            format!("must be between 0 (keep forever) and {MAX_RETENTION_MS} (100 years)"),
        ))
    }
}

/// A protobuf timestamp within its documented range, years 1 to 9999 (which PostgreSQL
/// can store).
pub fn timestamp(field: &str, at: &Timestamp) -> Result<SystemTime, FieldError> {
    // 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
    if at.seconds < -62_135_596_800 {
        return Err(FieldError::new(field, "is before year 1"));
    }
    if at.seconds > 253_402_300_799 {
        return Err(FieldError::new(field, "is after year 9999"));
    }
    SystemTime::try_from(*at).map_err(|_| FieldError::new(field, "is not a valid timestamp"))
}

/// An optional [`timestamp`]: unset is none.
pub fn optional_timestamp(
    field: &str,
    at: Option<&Timestamp>,
) -> Result<Option<SystemTime>, FieldError> {
    at.map(|at| timestamp(field, at)).transpose()
}

/// A creation window `[after, before)`: when both ends are set, `before` must be later
/// (the error names `before_field`).
pub fn time_window(
    before_field: &str,
    after: Option<SystemTime>,
    before: Option<SystemTime>,
) -> Result<(), FieldError> {
    match (after, before) {
        (Some(after), Some(before)) if before <= after => Err(FieldError::new(
            before_field,
            "must be later than created_after",
        )),
        _ => Ok(()),
    }
}

/// A sequence cursor: zero or more.
pub fn cursor(field: &str, value: i64) -> Result<i64, FieldError> {
    if value < 0 {
        Err(FieldError::new(field, "must not be negative"))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_named() {
        assert_eq!(name_or("queue", "", "default").unwrap(), "default");
        assert_eq!(name("queue", "a b").unwrap_err().field, "queue");
        assert_eq!(
            names("labels", &["gpu".into(), "".into()])
                .unwrap_err()
                .field,
            "labels[1]"
        );
        assert_eq!(
            names("labels", &["gpu".into(), "gpu".into()]).unwrap(),
            vec!["gpu"]
        );
        assert!(name("queue", &"q".repeat(MAX_NAME_LEN + 1)).is_err());
        let many: Vec<String> = (0..=MAX_LIST_LEN).map(|i| format!("l{i}")).collect();
        assert_eq!(names("labels", &many).unwrap_err().field, "labels");
        assert_eq!(
            names("labels", &many[..MAX_LIST_LEN]).unwrap().len(),
            MAX_LIST_LEN
        );
    }

    #[test]
    fn text_refuses_nul() {
        assert_eq!(text("reason", "because").unwrap(), "because");
        assert_eq!(text("reason", "a\0b").unwrap_err().field, "reason");
        assert!(short_text("name", "n", 1).is_ok());
        assert!(short_text("name", "nn", 1).is_err());
    }

    #[test]
    fn typed_text_is_trimmed() {
        let mut object = serde_json::json!({"prompt": "  hi there \n", "n": 1});
        let map = object.as_object_mut().unwrap();
        trim_text_in(map, "prompt", "input_json.prompt").unwrap();
        assert_eq!(map["prompt"], "hi there");
        assert!(trim_text_in(map, "missing", "x").is_ok());
        assert_eq!(trim_text_in(map, "n", "n").unwrap_err().field, "n");
        map.insert("prompt".into(), " \t\n ".into());
        let err = trim_text_in(map, "prompt", "input_json.prompt").unwrap_err();
        assert_eq!(err.field, "input_json.prompt");
    }

    #[test]
    fn json_values_of_any_kind() {
        assert_eq!(json_value("v", " ", 10).unwrap(), None);
        assert_eq!(
            json_value("v", "[1,2]", 10).unwrap(),
            Some(serde_json::json!([1, 2]))
        );
        assert_eq!(
            json_value("v", "\"ok\"", 10).unwrap(),
            Some(serde_json::json!("ok"))
        );
        assert_eq!(json_value("v", "{oops", 10).unwrap_err().field, "v");
        assert!(json_value("v", "[1,2,3,4,5,6]", 10).is_err());
        assert!(json_value("v", r#"{"a": "x\u0000"}"#, 100).is_err());
    }

    #[test]
    fn timestamps_are_in_range() {
        let at = |seconds, nanos| Timestamp { seconds, nanos };
        assert!(timestamp("t", &at(1_700_000_000, 5)).is_ok());
        assert_eq!(
            timestamp("t", &at(-62_135_596_801, 0)).unwrap_err().field,
            "t"
        );
        assert!(timestamp("t", &at(253_402_300_799, 0)).is_ok());
        assert!(timestamp("t", &at(253_402_300_800, 0)).is_err());
        assert!(timestamp("t", &at(i64::MAX, 0)).is_err());
        assert_eq!(optional_timestamp("t", None).unwrap(), None);
        let (early, late) = (
            timestamp("t", &at(10, 0)).ok(),
            timestamp("t", &at(20, 0)).ok(),
        );
        assert!(time_window("b", early, late).is_ok());
        assert!(time_window("b", early, None).is_ok());
        assert_eq!(time_window("b", late, early).unwrap_err().field, "b");
        assert!(time_window("b", early, early).is_err());
    }

    #[test]
    fn numbers_have_ranges() {
        assert_eq!(bounded("limit", 0, 100, 1, 1000).unwrap(), 100);
        assert!(bounded("limit", 1001, 100, 1, 1000).is_err());
        assert!(timeout_ms("run_timeout_ms", -1).is_err());
        assert_eq!(timeout_ms("run_timeout_ms", 0).unwrap(), None);
        assert_eq!(
            timeout_ms("run_timeout_ms", MAX_TIMEOUT_MS).unwrap(),
            Some(MAX_TIMEOUT_MS)
        );
        assert!(timeout_ms("run_timeout_ms", MAX_TIMEOUT_MS + 1).is_err());
        assert!(timeout_ms("queue_timeout_ms", i64::MAX).is_err());
    }
}
