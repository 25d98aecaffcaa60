//! Prometheus remote write 1.0: a snappy-compressed (block format) protobuf `WriteRequest`.
//! Every sample becomes a `metric.sample` named by its `__name__` label, the other labels
//! kept as they are. Remote write 2.0 is refused (its content type names another message).

use serde_json::{json, Value};

use crate::events::FieldError;

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
        }
    }
}

/// Decompresses (checking the size the block claims before allocating) and decodes.
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
    <WriteRequest as prost::Message>::decode(raw.as_slice())
        .map_err(|e| DecodeError::Protobuf(e.to_string()))
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
    let mut errors = Vec::new();
    if req.timeseries.len() > MAX_SERIES {
        errors.push(FieldError::new(
            "timeseries",
            format!(
                "{} series; at most {MAX_SERIES} per request",
                req.timeseries.len()
            ),
        ));
    }
    let samples: usize = req.timeseries.iter().map(|t| t.samples.len()).sum();
    if samples > MAX_SAMPLES {
        errors.push(FieldError::new(
            "samples",
            format!("{samples} samples; at most {MAX_SAMPLES} per request"),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut events = Vec::with_capacity(samples);
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
    use prost::Message;

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
}
