//! Envelope times as text, written without `core::fmt`: every accepted event carries two, and
//! formatting them through chrono's `Display` was about 8 % of the JSON door's own work per
//! event (the `ingest_cpu` example of `tally-tests`, profiled).
//!
//! Contract: [`serialize`] writes exactly what chrono's own `Serialize` for `DateTime<Utc>`
//! writes (RFC 3339, `Z`, the fraction in 0, 3, 6 or 9 digits, whichever is shortest exact),
//! so the stored form of an envelope does not change; times it does not cover (years outside
//! 0..=9999, leap seconds) are handed to chrono.
//!
//! [`deserialize`] reads them back as chrono's `Deserialize` does, the same times and the same
//! errors, without chrono's general parser for the one shape [`serialize`] writes (any 1 to 9
//! digits of fraction): that parser was about a seventh of the projector's work per record (the
//! `projector_cpu` example of `tally-tests`). Every other text is handed to chrono.

use std::fmt;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, Timelike, Utc};
use serde::{de, Deserializer, Serialize, Serializer};

/// The longest text written here: `9999-12-31T23:59:59.999999999Z`.
const MAX_LEN: usize = 30;

/// `t` as chrono's `Serialize` writes it, or `None` where chrono must write it.
fn write(t: &DateTime<Utc>, buf: &mut [u8; MAX_LEN]) -> Option<usize> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let nanos = t.nanosecond();
    if nanos >= 1_000_000_000 {
        return None;
    }
    let fields = [
        (year, 4, b'-'),
        (t.month(), 2, b'-'),
        (t.day(), 2, b'T'),
        (t.hour(), 2, b':'),
        (t.minute(), 2, b':'),
        (t.second(), 2, b'.'),
    ];
    let mut at = 0;
    for (value, digits, separator) in fields {
        at = put(buf, at, value, digits);
        buf[at] = separator;
        at += 1;
    }
    if nanos == 0 {
        at -= 1; // no fraction: the '.' is overwritten by the 'Z'
    } else if nanos.is_multiple_of(1_000_000) {
        at = put(buf, at, nanos / 1_000_000, 3);
    } else if nanos.is_multiple_of(1_000) {
        at = put(buf, at, nanos / 1_000, 6);
    } else {
        at = put(buf, at, nanos, 9);
    }
    buf[at] = b'Z';
    Some(at + 1)
}

/// Writes `value` in `digits` decimal digits at `at`; returns where the next byte goes.
fn put(buf: &mut [u8; MAX_LEN], at: usize, value: u32, digits: u32) -> usize {
    let mut divisor = 10u32.pow(digits - 1);
    for slot in &mut buf[at..at + digits as usize] {
        *slot = b'0' + (value / divisor % 10) as u8;
        divisor /= 10;
    }
    at + digits as usize
}

/// [`write`]'s text (ending in `Z`), or `None` where chrono must write it.
fn text<'b>(t: &DateTime<Utc>, buf: &'b mut [u8; MAX_LEN]) -> Option<&'b str> {
    let len = write(t, buf)?;
    // Only ASCII digits and separators are written, so the text is always UTF-8.
    std::str::from_utf8(&buf[..len]).ok()
}

/// Serializes `t` as chrono does (for `#[serde(serialize_with)]`).
pub fn serialize<S: Serializer>(t: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    match text(t, &mut [0u8; MAX_LEN]) {
        Some(text) => serializer.serialize_str(text),
        None => t.serialize(serializer),
    }
}

/// `t.to_rfc3339()`, byte for byte (the offset as `+00:00`, not `Z`), without `core::fmt`.
pub fn to_rfc3339(t: &DateTime<Utc>) -> String {
    match text(t, &mut [0u8; MAX_LEN]).and_then(|text| text.strip_suffix('Z')) {
        Some(text) => [text, "+00:00"].concat(),
        None => t.to_rfc3339(),
    }
}

/// `to_rfc3339(t).len()`, without writing the text anywhere but the stack.
pub fn rfc3339_len(t: &DateTime<Utc>) -> usize {
    match text(t, &mut [0u8; MAX_LEN]).and_then(|text| text.strip_suffix('Z')) {
        Some(text) => text.len() + "+00:00".len(),
        None => t.to_rfc3339().len(),
    }
}

/// Deserializes a time as chrono's `Deserialize` for `DateTime<Utc>` does (for
/// `#[serde(deserialize_with)]`).
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    deserializer.deserialize_str(TimeVisitor)
}

struct TimeVisitor;

impl de::Visitor<'_> for TimeVisitor {
    type Value = DateTime<Utc>;

    /// chrono's words, so that a refusal reads the same.
    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an RFC 3339 formatted date and time string")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<DateTime<Utc>, E> {
        match parse(value.as_bytes()) {
            Some(t) => Ok(t),
            None => value
                .parse::<DateTime<FixedOffset>>()
                .map(|t| t.with_timezone(&Utc))
                .map_err(E::custom),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.F]Z` with 1 to 9 digits of fraction `F`, seconds below 60, a date
/// that exists; `None` for anything else (chrono then decides).
fn parse(text: &[u8]) -> Option<DateTime<Utc>> {
    let (head, fraction) = match text {
        [head @ .., b'Z'] if head.len() == 19 => (head, &[][..]),
        [head @ .., b'Z'] if head.len() > 20 && head[19] == b'.' => (&head[..19], &head[20..]),
        _ => return None,
    };
    let number = |at: usize, digits: usize| -> Option<u32> {
        head[at..at + digits].iter().try_fold(0u32, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
        })
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(at, b)| head[at] != b) || fraction.len() > 9 {
        return None;
    }
    let mut nanos = 0u32;
    for i in 0..9 {
        let digit = match fraction.get(i) {
            Some(b) if b.is_ascii_digit() => u32::from(b - b'0'),
            Some(_) => return None,
            None => 0,
        };
        nanos = nanos * 10 + digit;
    }
    let second = number(17, 2).filter(|s| *s < 60)?;
    let date = NaiveDate::from_ymd_opt(number(0, 4)? as i32, number(5, 2)?, number(8, 2)?)?;
    let time = date.and_hms_nano_opt(number(11, 2)?, number(14, 2)?, second, nanos)?;
    Some(time.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ours(t: &DateTime<Utc>) -> String {
        serialize(t, serde_json::value::Serializer)
            .expect("serializes")
            .as_str()
            .expect("a string")
            .to_string()
    }

    #[test]
    fn times_are_written_as_chrono_writes_them() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let whole = Utc.with_ymd_and_hms(2026, 12, 3, 14, 5, 9).unwrap();
        let mut times = vec![
            whole,
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 6, 30, 12, 0, 0).unwrap(),
            Utc::now(),
        ];
        for nanos in [
            1,
            999_999_999,
            1_000,
            1_000_000,
            120_000_000,
            100,
            10_000_000,
        ] {
            times.push(whole + chrono::Duration::nanoseconds(nanos));
        }
        for _ in 0..20_000 {
            let secs = (next() % 400_000_000_000) as i64 - 62_000_000_000;
            let nanos = match next() % 4 {
                0 => 0,
                1 => (next() % 1_000) as u32 * 1_000_000,
                2 => (next() % 1_000_000) as u32 * 1_000,
                _ => (next() % 1_000_000_000) as u32,
            };
            times.push(DateTime::from_timestamp(secs, nanos).expect("in range"));
        }
        // A leap second, which chrono keeps as nanoseconds past 10^9.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .expect("a leap second")
            .and_utc();
        times.push(leap);
        for t in &times {
            let chrono = serde_json::to_value(t).expect("serializes");
            assert_eq!(ours(t), chrono.as_str().expect("a string"), "{t:?}");
            assert_eq!(to_rfc3339(t), t.to_rfc3339(), "{t:?}");
            assert_eq!(rfc3339_len(t), t.to_rfc3339().len(), "{t:?}");
            // Read back as chrono reads it, the fast shape or not.
            assert_eq!(read(&chrono), Ok(*t), "{t:?}");
        }
    }

    /// [`deserialize`] of a JSON value, its error as text.
    fn read(v: &serde_json::Value) -> Result<DateTime<Utc>, String> {
        deserialize(v).map_err(|e| e.to_string())
    }

    #[test]
    fn times_are_read_as_chrono_reads_them() {
        let texts = [
            "2026-12-03T14:05:09Z",
            "2026-12-03T14:05:09.1Z",
            "2026-12-03T14:05:09.123456789Z",
            "2026-12-03T14:05:09.1234567891Z",
            "2026-12-03T14:05:09.Z",
            "2026-12-03T14:05:09,5Z",
            "2026-12-03t14:05:09z",
            "2026-12-03 14:05:09Z",
            "2026-12-03T14:05:09+02:00",
            "2026-12-03T14:05:09.5-00:30",
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.5Z",
            "2026-02-29T00:00:00Z",
            "2024-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-12-32T00:00:00Z",
            "2026-12-03T24:00:00Z",
            "2026-12-03T14:60:00Z",
            "0000-01-01T00:00:00Z",
            "+12026-12-03T14:05:09Z",
            "2026-12-03T14:05:0aZ",
            "2026-12-03T14:05:09.12a4Z",
            "2026-1-03T14:05:09Z",
            "２０２６-12-03T14:05:09Z",
            "2026-12-03T14:05:09",
            "2026-12-03",
            "",
            "Z",
        ];
        for text in texts {
            let v = serde_json::Value::from(text);
            let chrono =
                serde_json::from_value::<DateTime<Utc>>(v.clone()).map_err(|e| e.to_string());
            assert_eq!(read(&v), chrono, "{text:?}");
        }
        // Not a string at all: refused in chrono's words.
        for v in [
            serde_json::json!(5),
            serde_json::json!(null),
            serde_json::json!(["x"]),
        ] {
            let chrono =
                serde_json::from_value::<DateTime<Utc>>(v.clone()).map_err(|e| e.to_string());
            assert_eq!(read(&v), chrono, "{v}");
        }
    }
}
