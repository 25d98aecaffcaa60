//! InfluxDB line protocol (`measurement,tag=v field=1.5,other=2i 1700000000000000000`),
//! parsed line by line: a bad line is reported with its number and never stops the others.
//! Each numeric or boolean field of a line becomes one `metric.sample` (see `to_events`),
//! carrying the line's tags: the request's size is bounded as it is parsed (fields, tags per
//! line, and the bytes of events it would make), before any event is built.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use crate::formats::expansion;
use shared::events::{FieldError, MAX_LABELS};

/// Most lines one request may carry.
pub const MAX_LINES: usize = 5_000;
/// Most fields (numeric, boolean or string) one request may carry; each numeric or boolean
/// one becomes a sample.
pub const MAX_FIELDS: usize = 50_000;

/// Unit of the timestamps (`precision` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Ns,
    Us,
    Ms,
    S,
}

impl Precision {
    /// `ns` (the default), `us`, `ms` or `s`; InfluxDB 1.x's `n`, `u` too.
    pub fn parse(s: Option<&str>) -> Option<Precision> {
        match s.unwrap_or("ns") {
            "ns" | "n" => Some(Precision::Ns),
            "us" | "u" => Some(Precision::Us),
            "ms" => Some(Precision::Ms),
            "s" => Some(Precision::S),
            _ => None,
        }
    }

    fn to_time(self, t: i64) -> Option<DateTime<Utc>> {
        let nanos = match self {
            Precision::Ns => Some(t),
            Precision::Us => t.checked_mul(1_000),
            Precision::Ms => t.checked_mul(1_000_000),
            Precision::S => t.checked_mul(1_000_000_000),
        }?;
        Some(Utc.timestamp_nanos(nanos))
    }
}

/// One parsed line.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// 1-based line number in the body.
    pub line: usize,
    pub measurement: String,
    pub tags: BTreeMap<String, String>,
    /// Numeric and boolean fields (booleans as 1/0). String fields are kept as labels of
    /// every sample of the line, prefixed `field.`.
    pub fields: Vec<(String, f64)>,
    pub strings: Vec<(String, String)>,
    pub time: Option<DateTime<Utc>>,
}

/// Why one line was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

/// Why a line, or the whole request, was refused while parsing.
enum Refusal {
    Line(String),
    Request(FieldError),
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Refusal::Line(reason)
    }
}

impl From<&str> for Refusal {
    fn from(reason: &str) -> Self {
        Refusal::Line(reason.into())
    }
}

/// Parses every line; returns the good points and the bad lines, or refuses the request
/// whole once it carries more than [`MAX_FIELDS`] fields or would make more than
/// [`expansion::MAX_EXPANDED_BYTES`] of events (checked line by line, before any is built).
pub fn parse(body: &str, precision: Precision) -> Result<(Vec<Point>, Vec<LineError>), FieldError> {
    let mut points = Vec::new();
    let mut errors = Vec::new();
    let (mut fields, mut expanded) = (0, 0);
    for (i, line) in body.lines().enumerate() {
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        match parse_line(text, precision, MAX_FIELDS - fields) {
            Ok(mut p) => {
                p.line = i + 1;
                fields += p.fields.len() + p.strings.len();
                expanded += p.weight();
                expansion::check(
                    "body",
                    expanded,
                    "each field's sample repeats its line's tags",
                )?;
                points.push(p);
            }
            Err(Refusal::Line(reason)) => errors.push(LineError {
                line: i + 1,
                reason,
            }),
            Err(Refusal::Request(e)) => return Err(e),
        }
    }
    Ok((points, errors))
}

/// Splits `s` at the first unescaped, unquoted `sep`.
fn split_unescaped(s: &str, sep: char) -> (&str, Option<&str>) {
    let mut escaped = false;
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => return (&s[..i], Some(&s[i + c.len_utf8()..])),
            _ => {}
        }
    }
    (s, None)
}

/// Every unescaped, unquoted piece of `s` between `sep`s, one at a time.
fn split_all(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let (head, tail) = split_unescaped(rest?, sep);
        rest = tail;
        Some(head)
    })
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n @ (',' | '=' | ' ' | '"' | '\\')) => out.push(n),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One line, with at most `room` fields (more refuses the request).
fn parse_line(text: &str, precision: Precision, room: usize) -> Result<Point, Refusal> {
    let (series, rest) = split_unescaped(text, ' ');
    let rest =
        rest.ok_or("no fields: a line is `measurement[,tag=value…] field=value[,…] [timestamp]`")?;
    let (fields_text, time_text) = split_unescaped(rest.trim_start(), ' ');
    let mut series_parts = split_all(series, ',');
    let measurement = unescape(series_parts.next().unwrap_or(""));
    if measurement.is_empty() {
        return Err("the measurement is empty".into());
    }
    let mut tags = BTreeMap::new();
    for tag in series_parts {
        let (k, v) = split_unescaped(tag, '=');
        let v = v.ok_or_else(|| format!("tag `{}` has no `=value`", unescape(k)))?;
        let (k, v) = (unescape(k), unescape(v));
        if k.is_empty() || v.is_empty() {
            return Err(format!("tag `{k}={v}`: keys and values must not be empty").into());
        }
        tags.insert(k, v);
        if tags.len() > MAX_LABELS {
            return Err(format!("more than {MAX_LABELS} tags").into());
        }
    }
    let mut fields = Vec::new();
    let mut strings = Vec::new();
    for field in split_all(fields_text, ',') {
        if fields.len() + strings.len() == room {
            return Err(Refusal::Request(FieldError::new(
                "body",
                format!("more than {MAX_FIELDS} fields; at most {MAX_FIELDS} per request"),
            )));
        }
        let (k, v) = split_unescaped(field, '=');
        let key = unescape(k);
        let v = v.ok_or_else(|| format!("field `{key}` has no `=value`"))?;
        if key.is_empty() {
            return Err("a field key is empty".into());
        }
        if let Some(s) = v.strip_prefix('"') {
            let s = s
                .strip_suffix('"')
                .ok_or_else(|| format!("field `{key}`: unterminated string"))?;
            strings.push((key, unescape(s)));
            if tags.len() + strings.len() > MAX_LABELS {
                return Err(format!("more than {MAX_LABELS} tags and string fields").into());
            }
            continue;
        }
        let number = match v {
            "t" | "T" | "true" | "True" | "TRUE" => Some(1.0),
            "f" | "F" | "false" | "False" | "FALSE" => Some(0.0),
            _ => match v.strip_suffix('i').or_else(|| v.strip_suffix('u')) {
                Some(int) => int.parse::<i64>().ok().map(|n| n as f64),
                None => v.parse::<f64>().ok().filter(|f| f.is_finite()),
            },
        };
        let number = number
            .ok_or_else(|| format!("field `{key}`: `{v}` is not a number, boolean or string"))?;
        fields.push((key, number));
    }
    if fields.is_empty() && strings.is_empty() {
        return Err("no fields".into());
    }
    let time = match time_text.map(str::trim).filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => {
            let n: i64 = t
                .parse()
                .map_err(|_| format!("timestamp `{t}` is not an integer"))?;
            Some(
                precision
                    .to_time(n)
                    .ok_or_else(|| format!("timestamp `{t}` is out of range"))?,
            )
        }
    };
    Ok(Point {
        line: 0,
        measurement,
        tags,
        fields,
        strings,
        time,
    })
}

impl Point {
    /// About how many bytes of events [`Point::to_events`] makes: every sample repeats the
    /// measurement, the tags and the string fields.
    fn weight(&self) -> usize {
        let labels: usize = self
            .tags
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum::<usize>()
            + self
                .strings
                .iter()
                .map(|(k, v)| k.len() + v.len() + 12)
                .sum::<usize>();
        let names: usize = self.fields.iter().map(|(k, _)| k.len()).sum();
        let shared = expansion::Shared {
            bytes: self.measurement.len() + labels,
            entries: self.tags.len() + self.strings.len(),
        };
        expansion::weight(self.fields.len(), shared) + names
    }

    /// The `metric.sample` client events of this point: one per numeric field, named
    /// `<measurement>_<field>` (just `<measurement>` for a field called `value`), with the
    /// tags (and string fields, as `field.<key>`) as labels. `now` stands in for a missing
    /// timestamp.
    pub fn to_events(&self, now: DateTime<Utc>) -> Vec<Value> {
        let mut labels: BTreeMap<String, String> = self.tags.clone();
        for (k, v) in &self.strings {
            labels.insert(format!("field.{k}"), v.clone());
        }
        let at = self.time.unwrap_or(now).to_rfc3339();
        self.fields
            .iter()
            .map(|(field, value)| {
                let name = if field == "value" {
                    self.measurement.clone()
                } else {
                    format!("{}_{field}", self.measurement)
                };
                json!({"type": "metric.sample", "occurred_at": at,
                       "data": {"name": name, "labels": labels, "value": value, "kind": "gauge"}})
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_with_escapes_types_and_precision() {
        let body =
            "cpu,host=a\\ b,region=eu usage=0.5,cores=4i,up=t,note=\"x \\\"y\\\", z\" 1700000000\n\
                    \n# a comment\n\
                    mem value=12 \n\
                    bad line\n\
                    disk,host=a free=abc 1\n\
                    net,host=a rx=1u 99999999999999999999";
        let (points, errors) = parse(body, Precision::S).unwrap();
        assert_eq!(points.len(), 2, "{errors:?}");
        let cpu = &points[0];
        assert_eq!(cpu.line, 1);
        assert_eq!(cpu.tags["host"], "a b");
        assert_eq!(
            cpu.fields,
            vec![
                ("usage".into(), 0.5),
                ("cores".into(), 4.0),
                ("up".into(), 1.0)
            ]
        );
        assert_eq!(cpu.strings, vec![("note".into(), "x \"y\", z".into())]);
        assert_eq!(cpu.time.unwrap().timestamp(), 1_700_000_000);
        assert_eq!(points[1].line, 4);
        assert_eq!(points[1].time, None);
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![5, 6, 7]);
        assert!(errors[1].reason.contains("`abc`"), "{errors:?}");

        let events = points[1].to_events(Utc::now());
        assert_eq!(events[0]["data"]["name"], "mem");
        let events = cpu.to_events(Utc::now());
        assert_eq!(events.len(), 3);
        assert_eq!(events[0]["data"]["name"], "cpu_usage");
        assert_eq!(events[0]["data"]["labels"]["field.note"], "x \"y\", z");
    }

    #[test]
    fn precision_names() {
        assert_eq!(Precision::parse(None), Some(Precision::Ns));
        assert_eq!(Precision::parse(Some("ms")), Some(Precision::Ms));
        assert_eq!(Precision::parse(Some("h")), None);
        let (p, _) = parse("m v=1 1500", Precision::Ms).unwrap();
        assert_eq!(p[0].time.unwrap().timestamp_millis(), 1500);
    }

    #[test]
    fn requests_that_would_expand_are_refused_while_parsing() {
        // 60 tags of 16 KiB on one line, repeated by each of 5 000 fields: 4.6 GiB of events.
        let tags: String = (0..60)
            .map(|i| format!(",t{i}={}", "v".repeat(16 * 1024)))
            .collect();
        let fields = vec!["f=1"; 5_000].join(",");
        let err = parse(&format!("m{tags} {fields}"), Precision::Ns).unwrap_err();
        assert_eq!(err.field, "body");
        assert!(err.reason.contains("MiB of events"), "{}", err.reason);

        // Small lines are fine until their fields, together, pass the limit.
        let line = format!("m,host=a {}\n", vec!["f=1"; 100].join(","));
        let (points, errors) = parse(&line.repeat(MAX_FIELDS / 100), Precision::Ns).unwrap();
        assert_eq!((points.len(), errors.len()), (MAX_FIELDS / 100, 0));
        let err = parse(&line.repeat(MAX_FIELDS / 100 + 1), Precision::Ns).unwrap_err();
        assert!(err.reason.contains("fields"), "{}", err.reason);

        // Tags beyond what an event takes refuse the line, not the request.
        let many: String = (0..=MAX_LABELS).map(|i| format!(",t{i}=v")).collect();
        let (points, errors) = parse(&format!("m{many} f=1\nm g=2"), Precision::Ns).unwrap();
        assert_eq!(points.len(), 1);
        assert_eq!(errors[0].line, 1);
        assert!(errors[0].reason.contains("tags"), "{errors:?}");
    }
}
