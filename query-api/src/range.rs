//! Time ranges and buckets of dashboard requests: parsed once, with a clear error per field.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use shared::events::FieldError;

/// A validated, minute-aligned `[from, to)` range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// Range presets.
pub const PRESETS: [(&str, i64); 5] = [
    ("1h", 1),
    ("24h", 24),
    ("7d", 168),
    ("30d", 720),
    ("90d", 2160),
];

impl TimeRange {
    /// From `range` (a preset) or `from`/`to` (RFC 3339; `to` defaults to now). Widened to
    /// whole minutes: `from` is floored, `to` is ceiled. At most `max_days` long.
    pub fn parse(
        range: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
        now: DateTime<Utc>,
        max_days: i64,
    ) -> Result<TimeRange, FieldError> {
        let minute = TimeDelta::minutes(1);
        let floor = |t: DateTime<Utc>, field: &str| {
            t.duration_trunc(minute)
                .map_err(|_| FieldError::new(field, "is outside the supported time range"))
        };
        let ceil = |t: DateTime<Utc>, field: &str| {
            let f = floor(t, field)?;
            Ok::<_, FieldError>(if f == t { f } else { f + minute })
        };
        let (from, to) = match (range, from) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "range",
                    "give either `range` or `from`/`to`, not both",
                ))
            }
            (Some(r), None) => {
                let hours = PRESETS
                    .iter()
                    .find(|(name, _)| *name == r)
                    .map(|(_, h)| *h)
                    .ok_or_else(|| {
                        FieldError::new(
                            "range",
                            format!("unknown range `{r}`; use one of 1h, 24h, 7d, 30d, 90d"),
                        )
                    })?;
                (now - TimeDelta::hours(hours), now)
            }
            (None, Some(f)) => {
                let from = parse_time("from", f)?;
                let to = match to {
                    Some(t) => parse_time("to", t)?,
                    None => now,
                };
                (from, to)
            }
            (None, None) => {
                if to.is_some() {
                    return Err(FieldError::new("from", "`to` needs a `from`"));
                }
                (now - TimeDelta::hours(24), now)
            }
        };
        let (from, to) = (floor(from, "from")?, ceil(to, "to")?);
        if from >= to {
            return Err(FieldError::new("to", "`to` must be after `from`"));
        }
        if to - from > TimeDelta::days(max_days) {
            return Err(FieldError::new(
                "from",
                format!("the range may span at most {max_days} days"),
            ));
        }
        Ok(TimeRange { from, to })
    }
}

/// The times a range may name: from the Unix epoch to 2200 (chrono's nanosecond arithmetic,
/// which bucketing relies on, ends in 2262; nothing is stored beyond either end).
const EARLIEST: &str = "1970-01-01T00:00:00Z";
const LATEST: &str = "2200-01-01T00:00:00Z";

fn parse_time(field: &str, s: &str) -> Result<DateTime<Utc>, FieldError> {
    let t = DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| FieldError::new(field, format!("must be an RFC 3339 timestamp: {e}")))?;
    let bound = |b: &str| {
        DateTime::parse_from_rfc3339(b)
            .expect("constant bound")
            .with_timezone(&Utc)
    };
    if t < bound(EARLIEST) || t >= bound(LATEST) {
        return Err(FieldError::new(
            field,
            format!("must be between {EARLIEST} and {LATEST}"),
        ));
    }
    Ok(t)
}

/// A time-series bucket width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    M1,
    M5,
    M15,
    H1,
    D1,
    W1,
}

impl Bucket {
    pub fn parse(s: &str) -> Result<Bucket, FieldError> {
        Ok(match s {
            "1m" => Bucket::M1,
            "5m" => Bucket::M5,
            "15m" => Bucket::M15,
            "1h" => Bucket::H1,
            "1d" => Bucket::D1,
            "1w" => Bucket::W1,
            other => {
                return Err(FieldError::new(
                    "bucket",
                    format!("unknown bucket `{other}`; use 1m, 5m, 15m, 1h, 1d or 1w"),
                ))
            }
        })
    }

    pub fn width(self) -> TimeDelta {
        match self {
            Bucket::M1 => TimeDelta::minutes(1),
            Bucket::M5 => TimeDelta::minutes(5),
            Bucket::M15 => TimeDelta::minutes(15),
            Bucket::H1 => TimeDelta::hours(1),
            Bucket::D1 => TimeDelta::days(1),
            Bucket::W1 => TimeDelta::weeks(1),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::M1 => "1m",
            Bucket::M5 => "5m",
            Bucket::M15 => "15m",
            Bucket::H1 => "1h",
            Bucket::D1 => "1d",
            Bucket::W1 => "1w",
        }
    }
}

impl TimeRange {
    /// With `closed`, the whole UTC days the range touches that have ended by `now`: privacy
    /// mode's aggregates are made of (team, day) cells, served only once their day is over,
    /// so that reading the same answer again and again never shows one event arrive.
    /// Without, the range itself.
    pub fn closed_days_if(self, closed: bool, now: DateTime<Utc>) -> TimeRange {
        if !closed {
            return self;
        }
        let day = TimeDelta::days(1);
        let floor = |t: DateTime<Utc>| t.duration_trunc(day).unwrap_or(t);
        let from = floor(self.from);
        let ceil = if floor(self.to) == self.to {
            self.to
        } else {
            floor(self.to) + day
        };
        let to = ceil.min(floor(now)).max(from);
        TimeRange { from, to }
    }
}

/// The rollups a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    Minute,
    Hour,
    Day,
    /// Minutes at the edges, whole hours between (`activity_hours`).
    HourSpans,
    /// Minutes and hours at the edges, whole days between (`activity_days`).
    DaySpans,
}

impl Grain {
    /// The coarsest rollups that cover `range` exactly.
    pub fn for_range(range: &TimeRange) -> Grain {
        Grain::up_to(range, Grain::Day)
    }

    /// The rollups a time series of `bucket` reads: as coarse as both allow (a bucket is
    /// made of whole rollup buckets).
    pub fn for_series(bucket: Bucket, range: &TimeRange) -> Grain {
        match bucket {
            Bucket::M1 | Bucket::M5 | Bucket::M15 => Grain::Minute,
            Bucket::H1 => Grain::up_to(range, Grain::Hour),
            Bucket::D1 | Bucket::W1 => Grain::up_to(range, Grain::Day),
        }
    }

    fn up_to(range: &TimeRange, coarsest: Grain) -> Grain {
        let aligned = |w: TimeDelta| {
            range.from.duration_trunc(w).ok() == Some(range.from)
                && range.to.duration_trunc(w).ok() == Some(range.to)
        };
        let span = range.to - range.from;
        if coarsest == Grain::Day {
            if aligned(TimeDelta::days(1)) {
                return Grain::Day;
            }
            if span >= TimeDelta::days(1) {
                return Grain::DaySpans;
            }
        }
        if aligned(TimeDelta::hours(1)) {
            Grain::Hour
        } else if span >= TimeDelta::hours(2) {
            Grain::HourSpans
        } else {
            Grain::Minute
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 12, 30, 15).unwrap()
    }

    #[test]
    fn privacy_ranges_are_the_days_that_ended() {
        let r = TimeRange::parse(Some("7d"), None, None, now(), 90).unwrap();
        let closed = r.closed_days_if(true, now());
        assert_eq!(
            closed.from,
            Utc.with_ymd_and_hms(2026, 11, 18, 0, 0, 0).unwrap()
        );
        assert_eq!(
            closed.to,
            Utc.with_ymd_and_hms(2026, 11, 25, 0, 0, 0).unwrap()
        );
        let hour = TimeRange::parse(Some("1h"), None, None, now(), 90).unwrap();
        let closed = hour.closed_days_if(true, now());
        assert_eq!(closed.from, closed.to, "no day of the last hour has ended");
        assert_eq!(hour.closed_days_if(false, now()), hour);
    }

    #[test]
    fn presets_and_explicit_ranges_parse() {
        let r = TimeRange::parse(Some("1h"), None, None, now(), 90).unwrap();
        assert_eq!(r.to, Utc.with_ymd_and_hms(2026, 11, 25, 12, 31, 0).unwrap());
        assert_eq!(
            r.from,
            Utc.with_ymd_and_hms(2026, 11, 25, 11, 30, 0).unwrap()
        );
        let r = TimeRange::parse(
            None,
            Some("2026-11-01T00:00:00Z"),
            Some("2026-11-02T00:00:00Z"),
            now(),
            90,
        )
        .unwrap();
        assert_eq!(Grain::for_range(&r), Grain::Day);
        let d = TimeRange::parse(None, None, None, now(), 90).unwrap();
        assert_eq!(d.to - d.from, TimeDelta::hours(24) + TimeDelta::minutes(1));
    }

    #[test]
    fn bad_ranges_name_their_field() {
        let cases = [
            (Some("2y"), None, None, "range"),
            (Some("1h"), Some("2026-11-01T00:00:00Z"), None, "range"),
            (None, Some("yesterday"), None, "from"),
            (
                None,
                Some("2026-11-02T00:00:00Z"),
                Some("2026-11-01T00:00:00Z"),
                "to",
            ),
            (
                None,
                Some("2026-01-01T00:00:00Z"),
                Some("2026-11-01T00:00:00Z"),
                "from",
            ),
            (None, None, Some("2026-11-01T00:00:00Z"), "from"),
            // Outside chrono's nanosecond range (1677..2262): refused, not a panic.
            (None, Some("0001-01-01T00:00:00Z"), None, "from"),
            (
                None,
                Some("2026-11-01T00:00:00Z"),
                Some("9999-12-31T23:59:59Z"),
                "to",
            ),
            (
                None,
                Some("1600-01-01T00:00:30Z"),
                Some("1600-01-02T00:00:00Z"),
                "from",
            ),
        ];
        for (range, from, to, field) in cases {
            let e = TimeRange::parse(range, from, to, now(), 90).unwrap_err();
            assert_eq!(e.field, field, "{range:?} {from:?} {to:?}: {e:?}");
        }
    }

    #[test]
    fn series_read_the_coarsest_exact_rollup() {
        let day = TimeRange::parse(
            None,
            Some("2026-11-01T00:00:00Z"),
            Some("2026-11-03T00:00:00Z"),
            now(),
            90,
        )
        .unwrap();
        assert_eq!(Grain::for_series(Bucket::M5, &day), Grain::Minute);
        assert_eq!(Grain::for_series(Bucket::H1, &day), Grain::Hour);
        assert_eq!(Grain::for_series(Bucket::W1, &day), Grain::Day);
        let odd = TimeRange::parse(
            None,
            Some("2026-11-01T00:07:00Z"),
            Some("2026-11-03T00:00:00Z"),
            now(),
            90,
        )
        .unwrap();
        assert_eq!(Grain::for_series(Bucket::D1, &odd), Grain::DaySpans);
        assert_eq!(Grain::for_series(Bucket::H1, &odd), Grain::HourSpans);
        assert_eq!(Grain::for_series(Bucket::M15, &odd), Grain::Minute);
        let short = TimeRange::parse(
            None,
            Some("2026-11-01T00:07:00Z"),
            Some("2026-11-01T01:00:00Z"),
            now(),
            90,
        )
        .unwrap();
        assert_eq!(Grain::for_range(&short), Grain::Minute);
        let day = TimeRange::parse(Some("24h"), None, None, now(), 90).unwrap();
        assert_eq!(Grain::for_range(&day), Grain::DaySpans);
        let hours = TimeRange::parse(Some("1h"), None, None, now(), 90).unwrap();
        assert_eq!(Grain::for_range(&hours), Grain::Minute);
        let twelve = TimeRange::parse(
            None,
            Some("2026-11-01T00:07:00Z"),
            Some("2026-11-01T12:00:00Z"),
            now(),
            90,
        )
        .unwrap();
        assert_eq!(Grain::for_range(&twelve), Grain::HourSpans);
        let month = TimeRange::parse(Some("30d"), None, None, now(), 90).unwrap();
        assert_eq!(Grain::for_range(&month), Grain::DaySpans);
        assert!(Bucket::parse("2h").is_err());
    }

    /// Found by schemathesis: a time past 2262 (or before 1677) panicked the handler.
    #[test]
    fn times_beyond_the_calendar_bounds_are_refused() {
        for (from, to, field) in [
            ("2263-01-01T00:00:00Z", None, "from"),
            ("0241-11-11T16:28:23Z", None, "from"),
            ("2026-11-25T00:00:00Z", Some("2263-01-01T00:00:00Z"), "to"),
            ("9999-12-31T23:59:59+01:00", None, "from"),
        ] {
            let e = TimeRange::parse(None, Some(from), to, now(), 90).unwrap_err();
            assert_eq!(e.field, field, "{from} {to:?}");
        }
        let r = TimeRange::parse(
            None,
            Some("2199-12-01T00:00:00Z"),
            Some("2199-12-31T00:00:00Z"),
            now(),
            90,
        );
        assert!(r.is_ok(), "{r:?}");
    }
}
