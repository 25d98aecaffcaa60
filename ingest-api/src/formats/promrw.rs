//! Prometheus remote write 1.0: a snappy-compressed (block format) protobuf `WriteRequest`.
//! Every sample becomes a `metric.sample` named by its `__name__` label, the other labels
//! kept as they are. Remote write 2.0 is refused (its content type names another message).
//!
//! A request's size is counted on the wire before it is decoded: series, samples, labels
//! per series and the bytes of events it would make (each sample repeats its series' labels)
//! are bounded before prost allocates anything, since an empty label costs 2 bytes on the
//! wire and 48 in memory.

use prost::Message;
use serde_json::{json, Value};

use crate::formats::expansion;
use crate::formats::protowire::each_field;
use shared::events::FieldError;

/// Most series one request may carry.
pub const MAX_SERIES: usize = 10_000;
/// Most samples one request may carry.
pub const MAX_SAMPLES: usize = 50_000;
/// Most labels one series may carry (`__name__` included).
pub const MAX_LABELS: usize = 64;

/// `prometheus.WriteRequest` (the fields remote write 1.0 senders fill).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// Why a body was refused; every case is the sender's fault (4xx, not retried).
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The snappy block says it decompresses to more than the limit.
    TooLarge {
        claimed: usize,
        limit: usize,
    },
    Snappy(String),
    Protobuf(String),
    /// More series, samples or bytes of events than a request may make.
    Exceeds(FieldError),
    /// Series with more labels than an event takes, each named.
    Invalid(Vec<FieldError>),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooLarge { claimed, limit } => write!(
                f,
                "the body decompresses to {claimed} bytes; at most {limit} are accepted"
            ),
            DecodeError::Snappy(e) => write!(f, "invalid snappy block: {e}"),
            DecodeError::Protobuf(e) => write!(f, "invalid WriteRequest protobuf: {e}"),
            DecodeError::Exceeds(e) => write!(f, "{}: {}", e.field, e.reason),
            DecodeError::Invalid(errors) => write!(f, "{} invalid series", errors.len()),
        }
    }
}

/// Decompresses (checking the size the block claims before allocating), bounds the request
/// from its wire form (see [`Size`]), and decodes.
pub fn decode(body: &[u8], max_decompressed: usize) -> Result<WriteRequest, DecodeError> {
    let claimed =
        snap::raw::decompress_len(body).map_err(|e| DecodeError::Snappy(e.to_string()))?;
    if claimed > max_decompressed {
        return Err(DecodeError::TooLarge {
            claimed,
            limit: max_decompressed,
        });
    }
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| DecodeError::Snappy(e.to_string()))?;
    let (size, crowded) = Size::on_wire(&raw).map_err(DecodeError::Protobuf)?;
    size.check().map_err(DecodeError::Exceeds)?;
    if !crowded.is_empty() {
        return Err(DecodeError::Invalid(crowded));
    }
    WriteRequest::decode(raw.as_slice()).map_err(|e| DecodeError::Protobuf(e.to_string()))
}

/// What a request would become: its series, its samples, and about how many bytes of events
/// (every sample repeats its series' labels).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Size {
    pub series: usize,
    pub samples: usize,
    pub expanded: usize,
}

impl Size {
    /// Of a decoded request.
    pub fn of(req: &WriteRequest) -> Size {
        let mut size = Size::default();
        for ts in &req.timeseries {
            let labels = expansion::Shared {
                bytes: ts.labels.iter().map(Message::encoded_len).sum(),
                entries: ts.labels.len(),
            };
            size.add(ts.samples.len(), labels);
        }
        size
    }

    /// Of an encoded `WriteRequest`, read without decoding it (nothing is allocated but the
    /// refusals): its size, and a refusal for each series with more than [`MAX_LABELS`]
    /// labels. Fields other than series, labels and samples are skipped, as prost does.
    pub fn on_wire(raw: &[u8]) -> Result<(Size, Vec<FieldError>), String> {
        let mut size = Size::default();
        let mut crowded = Vec::new();
        each_field(raw, |tag, series| {
            let (1, Some(series)) = (tag, series) else {
                return Ok(());
            };
            let (mut labels, mut label_bytes, mut samples) = (0, 0, 0);
            each_field(series, |tag, value| {
                match (tag, value) {
                    (1, Some(label)) => {
                        labels += 1;
                        label_bytes += label.len();
                    }
                    (2, Some(_)) => samples += 1,
                    _ => {}
                }
                Ok(())
            })?;
            if labels > MAX_LABELS {
                crowded.push(FieldError::new(
                    format!("timeseries[{}].labels", size.series),
                    format!("{labels} labels; at most {MAX_LABELS}"),
                ));
            }
            let shared = expansion::Shared {
                bytes: label_bytes,
                entries: labels,
            };
            size.add(samples, shared);
            Ok(())
        })?;
        Ok((size, crowded))
    }

    fn add(&mut self, samples: usize, labels: expansion::Shared) {
        self.series += 1;
        self.samples += samples;
        self.expanded = self
            .expanded
            .saturating_add(expansion::weight(samples, labels));
    }

    /// Refuses more than [`MAX_SERIES`] series, [`MAX_SAMPLES`] samples, or more than
    /// [`expansion::MAX_EXPANDED_BYTES`] of events.
    pub fn check(&self) -> Result<(), FieldError> {
        if self.series > MAX_SERIES {
            return Err(FieldError::new(
                "timeseries",
                format!("{} series; at most {MAX_SERIES} per request", self.series),
            ));
        }
        if self.samples > MAX_SAMPLES {
            return Err(FieldError::new(
                "samples",
                format!(
                    "{} samples; at most {MAX_SAMPLES} per request",
                    self.samples
                ),
            ));
        }
        expansion::check(
            "timeseries",
            self.expanded,
            "each sample repeats its series' labels",
        )
    }
}

/// Prometheus's label-name rule: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The client events of a request, or every reason it is refused (with the series index).
pub fn to_events(req: &WriteRequest) -> Result<Vec<Value>, Vec<FieldError>> {
    let size = Size::of(req);
    size.check().map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    let mut events = Vec::with_capacity(size.samples);
    for (i, ts) in req.timeseries.iter().enumerate() {
        let mut series_errors = Vec::new();
        let field = |f: &str| format!("timeseries[{i}].{f}");
        if ts.labels.len() > MAX_LABELS {
            series_errors.push(FieldError::new(
                field("labels"),
                format!("{} labels; at most {MAX_LABELS}", ts.labels.len()),
            ));
        }
        let mut name = None;
        let mut labels = serde_json::Map::new();
        for l in &ts.labels {
            if !valid_label_name(&l.name) {
                series_errors.push(FieldError::new(
                    field("labels"),
                    format!(
                        "label name `{}` does not match [a-zA-Z_][a-zA-Z0-9_]*",
                        l.name
                    ),
                ));
            } else if l.name == "__name__" {
                name = Some(l.value.clone());
            } else {
                labels.insert(l.name.clone(), Value::String(l.value.clone()));
            }
        }
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            series_errors.push(FieldError::new(field("labels"), "no `__name__` label"));
            errors.extend(series_errors);
            continue;
        };
        if !series_errors.is_empty() {
            errors.extend(series_errors);
            continue;
        }
        for s in &ts.samples {
            // Stale markers (a NaN) and other non-finite values carry no measurement.
            if !s.value.is_finite() {
                continue;
            }
            let Some(at) = chrono::DateTime::from_timestamp_millis(s.timestamp) else {
                errors.push(FieldError::new(field("samples"), "timestamp out of range"));
                continue;
            };
            events.push(
                json!({"type": "metric.sample", "occurred_at": at.to_rfc3339(),
                "data": {"name": name, "labels": labels, "value": s.value, "kind": "gauge"}}),
            );
        }
    }
    if errors.is_empty() {
        Ok(events)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, extra: &[(&str, &str)], samples: &[(f64, i64)]) -> TimeSeries {
        let mut labels = vec![Label {
            name: "__name__".into(),
            value: name.into(),
        }];
        labels.extend(extra.iter().map(|(n, v)| Label {
            name: (*n).into(),
            value: (*v).into(),
        }));
        TimeSeries {
            labels,
            samples: samples
                .iter()
                .map(|(value, timestamp)| Sample {
                    value: *value,
                    timestamp: *timestamp,
                })
                .collect(),
        }
    }

    fn compress(req: &WriteRequest) -> Vec<u8> {
        snap::raw::Encoder::new()
            .compress_vec(&req.encode_to_vec())
            .unwrap()
    }

    #[test]
    fn requests_decode_into_samples() {
        let req = WriteRequest {
            timeseries: vec![
                series(
                    "up",
                    &[("job", "prom")],
                    &[(1.0, 1_764_115_200_000), (f64::NAN, 1_764_115_201_000)],
                ),
                series(
                    "http_requests_total",
                    &[("code", "200")],
                    &[(42.0, 1_764_115_200_000)],
                ),
            ],
        };
        let decoded = decode(&compress(&req), 1 << 20).unwrap();
        // (NaN != NaN, so compare the parts.)
        assert_eq!(decoded.timeseries[1], req.timeseries[1]);
        assert_eq!(decoded.timeseries[0].labels, req.timeseries[0].labels);
        let events = to_events(&decoded).unwrap();
        assert_eq!(events.len(), 2, "the NaN stale marker is skipped");
        assert_eq!(events[0]["data"]["name"], "up");
        assert_eq!(events[0]["data"]["labels"]["job"], "prom");
        assert_eq!(events[1]["data"]["value"], 42.0);
    }

    #[test]
    fn bad_bodies_are_refused_before_allocating() {
        assert!(matches!(
            decode(b"not snappy at all", 1 << 20),
            Err(DecodeError::Snappy(_)) | Err(DecodeError::Protobuf(_))
        ));
        let good = compress(&WriteRequest {
            timeseries: vec![series("x", &[], &[(1.0, 1)])],
        });
        assert!(matches!(
            decode(&good[..good.len() - 2], 1 << 20),
            Err(DecodeError::Snappy(_))
        ));
        // A block that claims 4 GiB: refused from its header.
        let bomb = [0xff, 0xff, 0xff, 0xff, 0x0f, 0x00];
        assert!(matches!(
            decode(&bomb, 1 << 20),
            Err(DecodeError::TooLarge { .. })
        ));
        let bad_label = WriteRequest {
            timeseries: vec![series("x", &[("bad-name", "v")], &[(1.0, 1)])],
        };
        let errors = to_events(&bad_label).unwrap_err();
        assert!(errors[0].reason.contains("bad-name"));
        let nameless = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![],
                samples: vec![],
            }],
        };
        assert!(to_events(&nameless).is_err());
    }

    /// A `WriteRequest` of one series holding `n` empty labels (2 bytes each on the wire).
    fn empty_labels(n: usize) -> Vec<u8> {
        let series = [0x0a, 0x00].repeat(n);
        let mut raw = vec![0x0a];
        prost::encode_length_delimiter(series.len(), &mut raw).unwrap();
        raw.extend(series);
        raw
    }

    #[test]
    fn decoding_would_allocate_24_times_the_body_so_it_is_sized_on_the_wire_first() {
        // What prost alone does with 1 MiB of empty labels: 48 bytes each (two `String`s),
        // more with the vector's spare capacity.
        let raw = empty_labels(1 << 19);
        let decoded = WriteRequest::decode(raw.as_slice()).unwrap();
        let labels = &decoded.timeseries[0].labels;
        let heap = labels.capacity() * std::mem::size_of::<Label>();
        eprintln!(
            "{} labels: {heap} bytes decoded from a {}-byte body",
            labels.len(),
            raw.len()
        );
        assert!(
            heap > 23 * raw.len(),
            "{heap} bytes for a {}-byte body",
            raw.len()
        );
        drop(decoded);
        // `decode` counts on the wire first and refuses the series by name.
        let body = snap::raw::Encoder::new().compress_vec(&raw).unwrap();
        match decode(&body, 2 << 20) {
            Err(DecodeError::Invalid(errors)) => {
                assert_eq!(errors[0].field, "timeseries[0].labels");
                assert!(errors[0].reason.starts_with("524288 labels"), "{errors:?}");
            }
            other => panic!("{other:?}"),
        }
        // So are a million empty series.
        let series = snap::raw::Encoder::new()
            .compress_vec(&[0x0a, 0x00].repeat(1 << 20))
            .unwrap();
        match decode(&series, 4 << 20) {
            Err(DecodeError::Exceeds(e)) => assert_eq!(e.field, "timeseries"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn samples_that_repeat_large_labels_are_refused_before_decoding() {
        // 8 labels of 64 KiB on 20 000 samples: 10 GiB of events from a 530 KiB request.
        let extra: Vec<(String, String)> = (0..8)
            .map(|i| (format!("l{i}"), "v".repeat(64 * 1024)))
            .collect();
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let samples: Vec<(f64, i64)> = (0..20_000).map(|i| (1.0, i)).collect();
        let req = WriteRequest {
            timeseries: vec![series("bomb", &extra, &samples)],
        };
        match decode(&compress(&req), 10 << 20) {
            Err(DecodeError::Exceeds(e)) => {
                assert!(e.reason.contains("MiB of events"), "{}", e.reason)
            }
            other => panic!("{:?}", other.map(|r| r.timeseries.len())),
        }
        assert!(
            to_events(&req).is_err(),
            "the same bound guards a decoded request"
        );
    }

    #[test]
    fn the_wire_count_matches_the_decoded_request_and_skips_other_fields() {
        let req = WriteRequest {
            timeseries: vec![
                series("a", &[("job", "x")], &[(1.0, 1), (2.0, 2)]),
                series("b", &[], &[(3.0, 3)]),
            ],
        };
        let mut raw = req.encode_to_vec();
        // A `metadata` entry (field 3) and a varint, fixed64, fixed32 and a group, unknown.
        raw.extend([0x1a, 0x02, 0x08, 0x01, 0x20, 0x05, 0x29]);
        raw.extend([0u8; 8]);
        raw.extend([0x35, 0, 0, 0, 0, 0x3b, 0x08, 0x01, 0x3c]);
        let (size, crowded) = Size::on_wire(&raw).unwrap();
        assert!(crowded.is_empty());
        assert_eq!(
            size,
            Size::of(&WriteRequest::decode(raw.as_slice()).unwrap())
        );
        assert_eq!((size.series, size.samples), (2, 3));
        for bad in [
            &[0x0a, 0x05, 0x00][..],
            &[0x08][..],
            &[0x3b, 0x08, 0x01][..],
            &[0x00],
        ] {
            assert!(Size::on_wire(bad).is_err(), "{bad:?}");
        }
    }
}
