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

use agentrun_shared::error::FieldError;
use agentrun_shared::payload::NUL_REASON;

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
