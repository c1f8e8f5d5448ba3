//! Durations as the command line takes them: a number with a unit (`500ms`, `6s`,
//! `10m`, `2h`, `1d`), or a plain number of milliseconds. One parser for every flag, so
//! they all accept the same spellings and fail with the same message.

use std::time::Duration;

/// The units a duration may carry, with their length in milliseconds.
const UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];

/// Parses `500ms`, `6s`, `10m`, `2h`, `1d` or plain milliseconds (`1500`).
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(format!(
            "invalid duration {text:?}: expected a number with a unit (500ms, 6s, 10m, 2h, 1d) or milliseconds"
        ));
    }
    let millis_per_unit = match unit {
        "" => 1,
        unit => UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, millis)| *millis)
            .ok_or_else(|| {
                format!("invalid duration {text:?}: unknown unit {unit:?} (use ms, s, m, h or d)")
            })?,
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(millis_per_unit))
        .map(Duration::from_millis)
        .ok_or_else(|| format!("invalid duration {text:?}: too large"))
}

/// A duration in the largest unit that holds it exactly (`7d`, `90m`, `1500ms`), as
/// [`parse`] reads it back.
pub fn format(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".into();
    }
    UNITS
        .iter()
        .rev()
        .find(|(_, unit)| millis.is_multiple_of(u128::from(*unit)))
        .map_or_else(
            || format!("{millis}ms"),
            |(name, unit)| format!("{}{name}", millis / u128::from(*unit)),
        )
}

/// A duration in whole milliseconds, as the protos carry them (saturating).
pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_plain_milliseconds() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("6s"), Ok(Duration::from_secs(6)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7_200)));
        assert_eq!(parse("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("1500"), Ok(Duration::from_millis(1_500)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse(" 30d "), Ok(Duration::from_secs(30 * 86_400)));
    }

    #[test]
    fn wrong_spellings_say_what_is_accepted() {
        let unit = parse("5x").unwrap_err();
        assert!(unit.contains("unknown unit \"x\""), "{unit}");
        let empty = parse("").unwrap_err();
        assert!(empty.contains("expected a number"), "{empty}");
        assert!(parse("s").is_err());
        assert!(parse("-5s").is_err());
        assert!(parse("1.5h").is_err());
        assert!(parse("6 s").is_err());
        assert!(
            parse("99999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(millis(Duration::from_secs(2)), 2_000);
    }

    #[test]
    fn formatting_reads_back() {
        for text in ["7d", "90m", "1500ms", "2h", "6s", "0s"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
    }
}
