//! When a schedule comes due: a cron expression read in an IANA time zone (croner, with
//! chrono-tz's zone data, so daylight-saving gaps and overlaps follow croner's
//! Vixie-cron rules), or a fixed interval counted from the schedule's creation.

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use agentrun_shared::error::FieldError;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};

/// The shortest interval a schedule may have.
pub const MIN_INTERVAL_MS: i64 = 1000;
/// The longest: ten years.
pub const MAX_INTERVAL_MS: i64 = 10 * 365 * 24 * 3600 * 1000;
/// The longest cron expression accepted.
const MAX_CRON_BYTES: usize = 256;

/// A schedule's due times.
#[derive(Debug, Clone)]
pub enum Timing {
    /// `expr` as given, parsed into `cron`, read in `zone`.
    Cron {
        expr: String,
        cron: Box<Cron>,
        zone: Tz,
    },
    /// Every `ms` milliseconds after the schedule's creation.
    Interval { ms: i64 },
}

impl Timing {
    /// Parses a cron expression (five fields, or six with seconds first) and an IANA zone
    /// name (empty: UTC). Errors name `cron_field` or `zone_field`.
    pub fn cron(
        cron_field: &str,
        expr: &str,
        zone_field: &str,
        zone: &str,
    ) -> Result<Self, FieldError> {
        let expr = expr.trim();
        if expr.len() > MAX_CRON_BYTES {
            return Err(FieldError::new(
                cron_field,
                format!("must be at most {MAX_CRON_BYTES} bytes"),
            ));
        }
        let fields = expr.split_whitespace().count();
        // Aliases (@daily) are one word; otherwise standard cron's five fields or six.
        if !expr.starts_with('@') && !(5..=6).contains(&fields) {
            return Err(FieldError::new(
                cron_field,
                "must have five fields (minute hour day-of-month month day-of-week), or six \
                 with seconds first",
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|err| {
                FieldError::new(cron_field, format!("is not a valid cron expression: {err}"))
            })?;
        let zone = if zone.is_empty() {
            Tz::UTC
        } else {
            Tz::from_str(zone).map_err(|_| {
                FieldError::new(zone_field, "is not an IANA time zone (e.g. Europe/Berlin)")
            })?
        };
        let timing = Self::Cron {
            expr: expr.to_owned(),
            cron: Box::new(cron),
            zone,
        };
        if timing
            .next_after(SystemTime::now(), SystemTime::now())
            .is_none()
        {
            return Err(FieldError::new(cron_field, "never comes due"));
        }
        Ok(timing)
    }

    /// A fixed interval in milliseconds, [`MIN_INTERVAL_MS`]..=[`MAX_INTERVAL_MS`].
    pub fn interval(field: &str, ms: i64) -> Result<Self, FieldError> {
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&ms) {
            return Err(FieldError::new(
                field,
                format!("must be between {MIN_INTERVAL_MS} and {MAX_INTERVAL_MS} milliseconds"),
            ));
        }
        Ok(Self::Interval { ms })
    }

    /// The first due time strictly after `t`, for a schedule created at `anchor`; `None`
    /// when there is none (a cron expression that never matches again).
    pub fn next_after(&self, anchor: SystemTime, t: SystemTime) -> Option<SystemTime> {
        match self {
            Self::Cron { cron, zone, .. } => {
                let at = DateTime::<Utc>::from(t).with_timezone(zone);
                let next = cron.find_next_occurrence(&at, false).ok()?;
                Some(SystemTime::from(next.with_timezone(&Utc)))
            }
            Self::Interval { ms } => {
                let step = Duration::from_millis(*ms as u64);
                let since = t.duration_since(anchor).unwrap_or_default();
                let steps = since.as_millis() / step.as_millis() + 1;
                anchor.checked_add(step.checked_mul(u32::try_from(steps).ok()?)?)
            }
        }
    }

    /// The last due time at or before `t` (and after `anchor`), if any.
    pub fn last_at_or_before(&self, anchor: SystemTime, t: SystemTime) -> Option<SystemTime> {
        let last = match self {
            Self::Cron { cron, zone, .. } => {
                let at = DateTime::<Utc>::from(t).with_timezone(zone);
                let last = cron.find_previous_occurrence(&at, true).ok()?;
                SystemTime::from(last.with_timezone(&Utc))
            }
            Self::Interval { ms } => {
                let step = Duration::from_millis(*ms as u64);
                let since = t.duration_since(anchor).ok()?;
                let steps = since.as_millis() / step.as_millis();
                anchor.checked_add(step.checked_mul(u32::try_from(steps).ok()?)?)?
            }
        };
        (last > anchor).then_some(last)
    }

    /// The cron expression and zone name, or the interval, as stored.
    pub fn parts(&self) -> (Option<&str>, &str, Option<i64>) {
        match self {
            Self::Cron { expr, zone, .. } => (Some(expr), zone.name(), None),
            Self::Interval { ms } => (None, "UTC", Some(*ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        SystemTime::from(DateTime::parse_from_rfc3339(rfc3339).unwrap())
    }

    fn cron(expr: &str, zone: &str) -> Timing {
        Timing::cron("cron", expr, "time_zone", zone).unwrap()
    }

    #[test]
    fn cron_is_read_in_its_zone_across_daylight_saving() {
        let nine = cron("0 9 * * *", "America/New_York");
        let anchor = at("2026-01-01T00:00:00Z");
        // Winter: 09:00 EST is 14:00 UTC.
        assert_eq!(
            nine.next_after(anchor, at("2026-03-07T15:00:00Z")),
            Some(at("2026-03-08T13:00:00Z")),
            "09:00 EDT on the day clocks spring forward is 13:00 UTC"
        );
        assert_eq!(
            nine.next_after(anchor, at("2026-03-06T15:00:00Z")),
            Some(at("2026-03-07T14:00:00Z"))
        );
        assert_eq!(
            nine.last_at_or_before(anchor, at("2026-03-08T13:00:00Z")),
            Some(at("2026-03-08T13:00:00Z")),
            "a due time is at or before itself"
        );
    }

    #[test]
    fn six_fields_have_seconds_first() {
        let every_ten = cron("*/10 * * * * *", "");
        let anchor = at("2026-01-01T00:00:00Z");
        assert_eq!(
            every_ten.next_after(anchor, at("2026-05-01T10:00:03.5Z")),
            Some(at("2026-05-01T10:00:10Z"))
        );
    }

    #[test]
    fn intervals_count_from_creation() {
        let every = Timing::interval("interval_ms", 1500).unwrap();
        let anchor = at("2026-05-01T10:00:00Z");
        assert_eq!(
            every.next_after(anchor, anchor),
            Some(at("2026-05-01T10:00:01.5Z"))
        );
        assert_eq!(
            every.next_after(anchor, at("2026-05-01T10:00:03Z")),
            Some(at("2026-05-01T10:00:04.5Z"))
        );
        assert_eq!(
            every.last_at_or_before(anchor, at("2026-05-01T10:00:01Z")),
            None
        );
        assert_eq!(
            every.last_at_or_before(anchor, at("2026-05-01T10:00:04Z")),
            Some(at("2026-05-01T10:00:03Z"))
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        for (expr, zone, field) in [
            ("not cron", "", "cron"),
            ("61 * * * *", "", "cron"),
            ("* * * *", "", "cron"),
            ("0 0 30 2 *", "", "cron"),
            ("0 9 * * *", "Mars/Olympus", "time_zone"),
        ] {
            let err = Timing::cron("cron", expr, "time_zone", zone).unwrap_err();
            assert_eq!(err.field, field, "{expr:?} in {zone:?}: {err}");
        }
        assert_eq!(Timing::interval("i", 999).unwrap_err().field, "i");
    }
}
