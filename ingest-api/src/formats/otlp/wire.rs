//! What an OTLP protobuf request holds, counted on the wire before prost decodes it. An
//! empty attribute is 2 bytes on the wire and about 60 in memory (a `KeyValue` with its
//! `AnyValue`), an empty quantile 2 and 16, so a 10 MiB body could ask prost for hundreds of
//! MiB; its points, records, attributes (at every level, nested values included), entries,
//! bucket counts and quantiles, and the depth of nested values are bounded first.

use crate::formats::protowire::each_field;
use shared::events::FieldError;

use super::{MAX_POINTS, MAX_RECORDS};

/// Most attributes one request may carry, at every level (resource, scope, point, record,
/// and the values nested in kvlists and arrays, each counting as one).
pub const MAX_ATTRIBUTES: usize = 200_000;
/// Most bucket counts and quantiles (exponential histograms, summaries) one request may carry.
pub const MAX_VALUES: usize = 1_000_000;
/// Most resource and scope entries one request may carry.
pub const MAX_ENTRIES: usize = 10_000;
/// Deepest nesting of kvlist and array values.
pub const MAX_DEPTH: usize = 16;

/// The counts of one request, as [`super::metric_events`] and [`super::log_events`] count
/// them (a metric without points counts as one point).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Shape {
    pub points: usize,
    pub records: usize,
    pub attributes: usize,
    pub values: usize,
    pub entries: usize,
}

/// Why a request was refused from its wire form.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a protobuf message of the expected shape (or nested too deeply).
    Malformed(String),
    /// More of something than a request may carry.
    TooMany(FieldError),
}

type R = Result<(), String>;

impl Shape {
    /// Of an encoded `ExportMetricsServiceRequest`.
    pub fn metrics(raw: &[u8]) -> Result<Shape, String> {
        let mut shape = Shape::default();
        each_field(raw, |tag, v| match (tag, v) {
            (1, Some(rm)) => shape.resource_entry(rm, Shape::scope_metrics),
            _ => Ok(()),
        })?;
        Ok(shape)
    }

    /// Of an encoded `ExportLogsServiceRequest`.
    pub fn logs(raw: &[u8]) -> Result<Shape, String> {
        let mut shape = Shape::default();
        each_field(raw, |tag, v| match (tag, v) {
            (1, Some(rl)) => shape.resource_entry(rl, Shape::scope_logs),
            _ => Ok(()),
        })?;
        Ok(shape)
    }

    /// Refuses more points, records, attributes, values or entries than a request may
    /// carry; `root` names the request's list (`resourceMetrics`).
    pub fn check(&self, root: &str) -> Result<(), FieldError> {
        let limits = [
            (self.points, MAX_POINTS, "data points"),
            (self.records, MAX_RECORDS, "log records"),
            (
                self.attributes,
                MAX_ATTRIBUTES,
                "attributes (at every level)",
            ),
            (self.values, MAX_VALUES, "bucket counts and quantiles"),
            (self.entries, MAX_ENTRIES, "resource and scope entries"),
        ];
        for (n, max, what) in limits {
            if n > max {
                return Err(FieldError::new(
                    root,
                    format!("{n} {what}; at most {max} per request"),
                ));
            }
        }
        Ok(())
    }

    /// `ResourceMetrics` or `ResourceLogs`: the resource (1) and its scope entries (2).
    fn resource_entry(&mut self, raw: &[u8], scope: fn(&mut Shape, &[u8]) -> R) -> R {
        self.entries += 1;
        each_field(raw, |tag, v| match (tag, v) {
            (1, Some(resource)) => self.attributes_of(resource, 1),
            (2, Some(entry)) => {
                self.entries += 1;
                scope(self, entry)
            }
            _ => Ok(()),
        })
    }

    /// `ScopeMetrics`: the scope (1) and its metrics (2).
    fn scope_metrics(&mut self, raw: &[u8]) -> R {
        each_field(raw, |tag, v| match (tag, v) {
            (1, Some(scope)) => self.attributes_of(scope, 3),
            (2, Some(metric)) => self.metric(metric),
            _ => Ok(()),
        })
    }

    /// `ScopeLogs`: the scope (1) and its log records (2; attributes 6, body 5).
    fn scope_logs(&mut self, raw: &[u8]) -> R {
        each_field(raw, |tag, v| match (tag, v) {
            (1, Some(scope)) => self.attributes_of(scope, 3),
            (2, Some(record)) => {
                self.records += 1;
                each_field(record, |tag, v| match (tag, v) {
                    (6, Some(kv)) => self.key_value(kv, 0),
                    (5, Some(body)) => self.any_value(body, 0),
                    _ => Ok(()),
                })
            }
            _ => Ok(()),
        })
    }

    /// `Metric`: the data points of its gauge (5), sum (7), histogram (9), exponential
    /// histogram (10) or summary (11), each a list of points in field 1.
    fn metric(&mut self, raw: &[u8]) -> R {
        let mut points = 0;
        each_field(raw, |tag, v| {
            let (Some(data), 5 | 7 | 9 | 10 | 11) = (v, tag) else {
                return Ok(());
            };
            each_field(data, |field, point| match (field, point) {
                (1, Some(point)) => {
                    points += 1;
                    self.point(tag, point)
                }
                _ => Ok(()),
            })
        })?;
        self.points += points.max(1);
        Ok(())
    }

    /// A data point of the metric type whose field number is `kind`.
    fn point(&mut self, kind: u64, raw: &[u8]) -> R {
        let attributes = match kind {
            9 => 9,
            10 => 1,
            _ => 7,
        };
        each_field(raw, |tag, v| match (kind, tag, v) {
            (_, t, Some(kv)) if t == attributes => self.key_value(kv, 0),
            // Summary quantiles; exponential histogram bucket lists.
            (11, 6, _) => {
                self.values += 1;
                Ok(())
            }
            (10, 8 | 9, Some(buckets)) => self.buckets(buckets),
            _ => Ok(()),
        })
    }

    /// `Buckets`: its counts (2), packed varints or one field each.
    fn buckets(&mut self, raw: &[u8]) -> R {
        each_field(raw, |tag, v| {
            match (tag, v) {
                (2, Some(packed)) => self.values += packed.iter().filter(|b| **b < 0x80).count(),
                (2, None) => self.values += 1,
                _ => {}
            }
            Ok(())
        })
    }

    /// The attributes (field `field`) of a `Resource` or `InstrumentationScope`.
    fn attributes_of(&mut self, raw: &[u8], field: u64) -> R {
        each_field(raw, |tag, v| match (tag, v) {
            (t, Some(kv)) if t == field => self.key_value(kv, 0),
            _ => Ok(()),
        })
    }

    /// `KeyValue`: one attribute, and its value (2).
    fn key_value(&mut self, raw: &[u8], depth: usize) -> R {
        self.attributes += 1;
        each_field(raw, |tag, v| match (tag, v) {
            (2, Some(value)) => self.any_value(value, depth),
            _ => Ok(()),
        })
    }

    /// `AnyValue`: an array (5) of values or a kvlist (6) of attributes nest one level.
    fn any_value(&mut self, raw: &[u8], depth: usize) -> R {
        each_field(raw, |tag, v| {
            let (Some(list), 5 | 6) = (v, tag) else {
                return Ok(());
            };
            if depth >= MAX_DEPTH {
                return Err(format!(
                    "values nested more than {MAX_DEPTH} levels deep (kvlists and arrays)"
                ));
            }
            each_field(list, |field, item| match (tag, field, item) {
                (5, 1, Some(value)) => {
                    self.attributes += 1;
                    self.any_value(value, depth + 1)
                }
                (6, 1, Some(kv)) => self.key_value(kv, depth + 1),
                _ => Ok(()),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::super::{decode, pb, DecodeError, Encoding, Logs, Metrics};
    use super::*;
    use crate::ingest::values::{tree_bytes, MAX_TREE_BYTES};

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/otlp/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    fn kv(key: &str, value: Option<pb::any_value::Value>) -> pb::KeyValue {
        pb::KeyValue {
            key: key.into(),
            value: Some(pb::AnyValue { value }),
        }
    }

    /// One gauge point of `n` empty attributes, as an encoded metrics request.
    fn empty_attributes(n: usize) -> Vec<u8> {
        let mut point = [0x3a, 0x00].repeat(n);
        point.extend([0x19, 1, 0, 0, 0, 0, 0, 0, 0]); // time_unix_nano
        wrap(point, &[0x0a, 0x2a, 0x12, 0x12, 0x0a])
    }

    /// `inner` as a field of each message around it: their field keys, innermost first.
    fn wrap(mut inner: Vec<u8>, keys: &[u8]) -> Vec<u8> {
        for &key in keys {
            let mut outer = vec![key];
            prost::encode_length_delimiter(inner.len(), &mut outer).unwrap();
            outer.extend(&inner);
            inner = outer;
        }
        inner
    }

    #[test]
    fn the_wire_count_matches_the_fixtures() {
        let raw = fixture("claude_code_metrics.pb");
        let shape = Shape::metrics(&raw).unwrap();
        let req = pb::ExportMetricsServiceRequest::decode(raw.as_slice()).unwrap();
        let converted = super::super::metric_events(&req).unwrap();
        assert_eq!(
            shape.points,
            converted.events.len() + converted.rejected.len()
        );
        assert!(shape.attributes > shape.points, "{shape:?}");
        assert!(shape.check("resourceMetrics").is_ok());
        let raw = fixture("claude_code_logs.pb");
        let shape = Shape::logs(&raw).unwrap();
        let req = pb::ExportLogsServiceRequest::decode(raw.as_slice()).unwrap();
        let records: usize = req
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum();
        let attributes: usize = req
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .flat_map(|s| &s.log_records)
            .map(|r| r.attributes.len())
            .sum();
        assert_eq!(shape.records, records);
        assert!(shape.attributes >= attributes, "{shape:?}");
        assert!(shape.check("resourceLogs").is_ok());
    }

    #[test]
    fn every_level_and_nested_value_is_counted() {
        use pb::any_value::Value as V;
        let nested = V::KvlistValue(pb::KeyValueList {
            values: vec![
                kv("a", None),
                kv(
                    "b",
                    Some(V::ArrayValue(pb::ArrayValue {
                        values: vec![pb::AnyValue::default(), pb::AnyValue::default()],
                    })),
                ),
            ],
        });
        let req = pb::ExportLogsServiceRequest {
            resource_logs: vec![pb::ResourceLogs {
                resource: Some(pb::Resource {
                    attributes: vec![kv("r", None)],
                }),
                scope_logs: vec![pb::ScopeLogs {
                    scope: Some(pb::InstrumentationScope {
                        attributes: vec![kv("s", None)],
                        ..Default::default()
                    }),
                    log_records: vec![pb::LogRecord {
                        attributes: vec![kv("n", Some(nested.clone()))],
                        body: Some(pb::AnyValue {
                            value: Some(nested),
                        }),
                        ..Default::default()
                    }],
                }],
            }],
        };
        let shape = Shape::logs(&req.encode_to_vec()).unwrap();
        // r, s, n and its 4 nested (a, b, two array items), the body's 4.
        assert_eq!(
            shape,
            Shape {
                records: 1,
                attributes: 11,
                entries: 2,
                ..Shape::default()
            }
        );
    }

    #[test]
    fn empty_attributes_would_decode_to_30_times_the_body_so_they_are_counted_first() {
        let raw = empty_attributes(1 << 19);
        let decoded = pb::ExportMetricsServiceRequest::decode(raw.as_slice()).unwrap();
        let Some(pb::metric::Data::Gauge(g)) =
            &decoded.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("a gauge")
        };
        let attributes = &g.data_points[0].attributes;
        assert_eq!(attributes.len(), 1 << 19);
        let heap = attributes.capacity() * std::mem::size_of::<pb::KeyValue>();
        eprintln!(
            "{} attributes: {heap} bytes decoded from a {}-byte body",
            attributes.len(),
            raw.len()
        );
        assert!(heap > 25 * raw.len(), "{heap} bytes");
        drop(decoded);
        match decode::<Metrics>(&raw, Encoding::Protobuf) {
            Err(DecodeError::TooMany(e)) => {
                assert_eq!(e.field, "resourceMetrics");
                assert!(e.reason.starts_with("524288 attributes"), "{}", e.reason);
            }
            other => panic!("{other:?}"),
        }
        assert!(decode::<Metrics>(&empty_attributes(1000), Encoding::Protobuf).is_ok());
    }

    #[test]
    fn other_bombs_and_malformed_bodies_are_refused_on_the_wire() {
        // A million empty resource entries, then a million empty log records.
        let entries = [0x0a, 0x00].repeat(1 << 20);
        match decode::<Logs>(&entries, Encoding::Protobuf) {
            Err(DecodeError::TooMany(e)) => assert!(e.reason.contains("resource and scope")),
            other => panic!("{other:?}"),
        }
        let records = wrap([0x12, 0x00].repeat(65_536), &[0x12, 0x0a]);
        match decode::<Logs>(&records, Encoding::Protobuf) {
            Err(DecodeError::TooMany(e)) => {
                assert!(e.reason.starts_with("65536 log records"), "{}", e.reason)
            }
            other => panic!("{other:?}"),
        }
        // Summary quantiles: 2 bytes each on the wire, 16 in memory.
        let quantiles = wrap(
            [0x32, 0x00].repeat(MAX_VALUES + 1),
            &[0x0a, 0x5a, 0x12, 0x12, 0x0a],
        );
        match decode::<Metrics>(&quantiles, Encoding::Protobuf) {
            Err(DecodeError::TooMany(e)) => assert!(e.reason.contains("quantiles")),
            other => panic!("{other:?}"),
        }
        // Values nested 17 deep in one attribute.
        let mut value = Vec::new();
        for _ in 0..=MAX_DEPTH {
            value = wrap(value, &[0x0a, 0x2a]);
        }
        // In a resource attribute's value: KeyValue, Resource, ResourceLogs, the request.
        let raw = wrap(value, &[0x12, 0x0a, 0x0a, 0x0a]);
        match decode::<Logs>(&raw, Encoding::Protobuf) {
            Err(DecodeError::Malformed(e)) => assert!(e.contains("nested"), "{e}"),
            other => panic!("{other:?}"),
        }
        for bad in [&[0x0a, 0x05, 0x00][..], &[0x0a][..], &[0x00]] {
            assert!(matches!(
                decode::<Metrics>(bad, Encoding::Protobuf),
                Err(DecodeError::Malformed(_))
            ));
        }
    }

    #[test]
    fn json_values_are_counted_in_the_text() {
        // Attributes of nothing but an empty key: 768 bytes of tree for 11 of text.
        let bomb = format!(
            r#"{{"resourceLogs":[{{"resource":{{"attributes":[{}{{}}]}}}}]}}"#,
            r#"{"key":""},"#.repeat(MAX_TREE_BYTES / 704)
        );
        assert!(bomb.len() < 1_000_000);
        match decode::<Logs>(bomb.as_bytes(), Encoding::Json) {
            Err(DecodeError::TooMany(e)) => {
                assert_eq!(e.field, "resourceLogs");
                assert!(e.reason.contains("MiB of JSON values"), "{}", e.reason);
            }
            other => panic!("{other:?}"),
        }
        let reserved = br#"{"resourceLogs":[{"$serde_json::private::RawValue":"[]"}]}"#;
        match decode::<Logs>(reserved, Encoding::Json) {
            Err(DecodeError::Malformed(e)) => assert!(e.contains("reserves"), "{e}"),
            other => panic!("{other:?}"),
        }
        let json = fixture("claude_code_logs.json");
        assert!(tree_bytes(&json) < 1 << 20);
        assert!(decode::<Logs>(&json, Encoding::Json).is_ok());
    }
}
