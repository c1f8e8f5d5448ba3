//! Input rules shared by the handlers: names, limits, paging.

use agentrun_shared::error::FieldError;

/// Longest name (queue, project, label, backend profile, idempotency key).
pub const MAX_NAME_LEN: usize = 128;

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

/// A list of names, each checked, with duplicates removed.
pub fn names(field: &str, items: &[String]) -> Result<Vec<String>, FieldError> {
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let item = name(&format!("{field}[{i}]"), item)?;
        if !out.iter().any(|o| o == item) {
            out.push(item.to_owned());
        }
    }
    Ok(out)
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

/// A timeout in milliseconds: zero means none, negative is refused.
pub fn timeout_ms(field: &str, value: i64) -> Result<Option<i64>, FieldError> {
    match value {
        0 => Ok(None),
        v if v < 0 => Err(FieldError::new(field, "must not be negative")),
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
    }

    #[test]
    fn numbers_have_ranges() {
        assert_eq!(bounded("limit", 0, 100, 1, 1000).unwrap(), 100);
        assert!(bounded("limit", 1001, 100, 1, 1000).is_err());
        assert!(timeout_ms("run_timeout_ms", -1).is_err());
        assert_eq!(timeout_ms("run_timeout_ms", 0).unwrap(), None);
    }
}
