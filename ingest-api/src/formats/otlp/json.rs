//! The OTLP/JSON mapping, by hand, into the same messages as the protobuf encoding: field
//! names in lowerCamelCase or as in the .proto (both are accepted), 64-bit integers as
//! strings or numbers, enums as integers or names, `oneof`s by the name of the field that is
//! set, trace and span ids in hex, `bytesValue` in base64, doubles also as `"NaN"` or
//! `"Infinity"`. Unknown fields are ignored, as the specification asks. Every error names
//! the JSON path of the offending field.

use base64::Engine;
use serde_json::{Map, Value};

use super::pb::*;

type R<T> = Result<T, String>;

/// One JSON object and where it sits in the document.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

fn snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn obj<'a>(v: &'a Value, path: &str) -> R<Obj<'a>> {
    match v {
        Value::Object(map) => Ok(Obj {
            map,
            path: path.to_string(),
        }),
        _ => Err(format!("{path}: expected an object")),
    }
}

impl<'a> Obj<'a> {
    /// The field by its JSON name or its .proto name; `null` counts as absent.
    fn get(&self, camel: &str) -> Option<(&'a Value, String)> {
        let v = self
            .map
            .get(camel)
            .or_else(|| self.map.get(&snake(camel)))?;
        (!v.is_null()).then(|| (v, format!("{}.{camel}", self.path)))
    }

    fn string(&self, k: &str) -> R<String> {
        match self.get(k) {
            None => Ok(String::new()),
            Some((Value::String(s), _)) => Ok(s.clone()),
            Some((_, p)) => Err(format!("{p}: expected a string")),
        }
    }

    fn boolean(&self, k: &str) -> R<bool> {
        match self.get(k) {
            None => Ok(false),
            Some((Value::Bool(b), _)) => Ok(*b),
            Some((_, p)) => Err(format!("{p}: expected true or false")),
        }
    }

    fn u64(&self, k: &str) -> R<u64> {
        self.get(k).map_or(Ok(0), |(v, p)| int(v, &p))
    }

    fn i32(&self, k: &str) -> R<i32> {
        self.get(k).map_or(Ok(0), |(v, p)| int(v, &p))
    }

    fn u32(&self, k: &str) -> R<u32> {
        self.get(k).map_or(Ok(0), |(v, p)| int(v, &p))
    }

    fn f64_opt(&self, k: &str) -> R<Option<f64>> {
        self.get(k).map(|(v, p)| double(v, &p)).transpose()
    }

    fn f64(&self, k: &str) -> R<f64> {
        Ok(self.f64_opt(k)?.unwrap_or(0.0))
    }

    /// An enum as its number or its name (`names` pairs each name with its number).
    fn enumeration(&self, k: &str, names: &[(&str, i32)]) -> R<i32> {
        match self.get(k) {
            None => Ok(0),
            Some((Value::String(s), p)) => match names.iter().find(|(n, _)| n == s) {
                Some((_, n)) => Ok(*n),
                None => int(&Value::String(s.clone()), &p)
                    .map_err(|_| format!("{p}: unknown value `{s}`")),
            },
            Some((v, p)) => int(v, &p),
        }
    }

    fn list<T>(&self, k: &str, f: impl Fn(&'a Value, &str) -> R<T>) -> R<Vec<T>> {
        match self.get(k) {
            None => Ok(Vec::new()),
            Some((Value::Array(items), p)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| f(v, &format!("{p}[{i}]")))
                .collect(),
            Some((_, p)) => Err(format!("{p}: expected an array")),
        }
    }

    fn message<T>(&self, k: &str, f: impl Fn(&'a Value, &str) -> R<T>) -> R<Option<T>> {
        self.get(k).map(|(v, p)| f(v, &p)).transpose()
    }

    /// Trace and span ids: hex, as OTLP/JSON has them.
    fn hex_bytes(&self, k: &str) -> R<Vec<u8>> {
        match self.get(k) {
            None => Ok(Vec::new()),
            Some((Value::String(s), p)) => {
                hex::decode(s).map_err(|_| format!("{p}: expected a hex string"))
            }
            Some((_, p)) => Err(format!("{p}: expected a hex string")),
        }
    }

    /// The one field of a `oneof` that is set, if any (two set is an error).
    fn one_of(&self, names: &[&'static str]) -> R<Option<(&'static str, &'a Value, String)>> {
        let mut found = None;
        for name in names {
            if let Some((v, p)) = self.get(name) {
                if let Some((other, _, _)) = found {
                    return Err(format!(
                        "{}: both `{other}` and `{name}` are set; they are alternatives",
                        self.path
                    ));
                }
                found = Some((*name, v, p));
            }
        }
        Ok(found)
    }
}

/// An integer as a JSON number or a decimal string.
fn int<T: TryFrom<i128>>(v: &Value, path: &str) -> R<T> {
    let n: Option<i128> = match v {
        Value::Number(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .or_else(|| {
                // `1e3` or `5.0` are integers in JSON's eyes too.
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                    .map(|f| f as i128)
            }),
        Value::String(s) => s.trim().parse::<i128>().ok(),
        _ => None,
    };
    n.and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| format!("{path}: expected an integer in range, as a number or a string"))
}

fn double(v: &Value, path: &str) -> R<f64> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("{path}: not a number")),
        Value::String(s) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            other => other
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{path}: expected a number")),
        },
        _ => Err(format!("{path}: expected a number")),
    }
}

// ---- common ----

fn any_value(v: &Value, path: &str) -> R<AnyValue> {
    use any_value::Value as V;
    let o = obj(v, path)?;
    let Some((name, v, p)) = o.one_of(&[
        "stringValue",
        "boolValue",
        "intValue",
        "doubleValue",
        "arrayValue",
        "kvlistValue",
        "bytesValue",
    ])?
    else {
        return Ok(AnyValue { value: None });
    };
    let value = match name {
        "stringValue" => V::StringValue(
            v.as_str()
                .ok_or_else(|| format!("{p}: expected a string"))?
                .to_string(),
        ),
        "boolValue" => V::BoolValue(v.as_bool().ok_or_else(|| format!("{p}: expected a bool"))?),
        "intValue" => V::IntValue(int(v, &p)?),
        "doubleValue" => V::DoubleValue(double(v, &p)?),
        "arrayValue" => V::ArrayValue(ArrayValue {
            values: obj(v, &p)?.list("values", any_value)?,
        }),
        "kvlistValue" => V::KvlistValue(KeyValueList {
            values: obj(v, &p)?.list("values", key_value)?,
        }),
        _ => V::BytesValue(
            v.as_str()
                .and_then(base64_any)
                .ok_or_else(|| format!("{p}: expected base64"))?,
        ),
    };
    Ok(AnyValue { value: Some(value) })
}

/// Base64 as proto3 JSON parsers take it: standard or URL-safe alphabet, padded or not.
fn base64_any(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(s).ok())
}

fn key_value(v: &Value, path: &str) -> R<KeyValue> {
    let o = obj(v, path)?;
    Ok(KeyValue {
        key: o.string("key")?,
        value: o.message("value", any_value)?,
    })
}

fn resource(v: &Value, path: &str) -> R<Resource> {
    Ok(Resource {
        attributes: obj(v, path)?.list("attributes", key_value)?,
    })
}

fn scope(v: &Value, path: &str) -> R<InstrumentationScope> {
    let o = obj(v, path)?;
    Ok(InstrumentationScope {
        name: o.string("name")?,
        version: o.string("version")?,
        attributes: o.list("attributes", key_value)?,
    })
}

// ---- metrics ----

const TEMPORALITIES: &[(&str, i32)] = &[
    ("AGGREGATION_TEMPORALITY_UNSPECIFIED", 0),
    ("AGGREGATION_TEMPORALITY_DELTA", TEMPORALITY_DELTA),
    ("AGGREGATION_TEMPORALITY_CUMULATIVE", TEMPORALITY_CUMULATIVE),
];

/// An `ExportMetricsServiceRequest` in OTLP/JSON.
pub fn metrics_request(v: &Value) -> R<ExportMetricsServiceRequest> {
    Ok(ExportMetricsServiceRequest {
        resource_metrics: obj(v, "$")?.list("resourceMetrics", |v, p| {
            let o = obj(v, p)?;
            Ok(ResourceMetrics {
                resource: o.message("resource", resource)?,
                scope_metrics: o.list("scopeMetrics", |v, p| {
                    let o = obj(v, p)?;
                    Ok(ScopeMetrics {
                        scope: o.message("scope", scope)?,
                        metrics: o.list("metrics", metric)?,
                    })
                })?,
            })
        })?,
    })
}

fn metric(v: &Value, path: &str) -> R<Metric> {
    use metric::Data;
    let o = obj(v, path)?;
    let data = match o.one_of(&[
        "gauge",
        "sum",
        "histogram",
        "exponentialHistogram",
        "summary",
    ])? {
        None => None,
        Some((name, v, p)) => {
            let d = obj(v, &p)?;
            let temporality = || d.enumeration("aggregationTemporality", TEMPORALITIES);
            Some(match name {
                "gauge" => Data::Gauge(Gauge {
                    data_points: d.list("dataPoints", number_point)?,
                }),
                "sum" => Data::Sum(Sum {
                    data_points: d.list("dataPoints", number_point)?,
                    aggregation_temporality: temporality()?,
                    is_monotonic: d.boolean("isMonotonic")?,
                }),
                "histogram" => Data::Histogram(Histogram {
                    data_points: d.list("dataPoints", histogram_point)?,
                    aggregation_temporality: temporality()?,
                }),
                "exponentialHistogram" => Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: d.list("dataPoints", exponential_point)?,
                    aggregation_temporality: temporality()?,
                }),
                _ => Data::Summary(Summary {
                    data_points: d.list("dataPoints", summary_point)?,
                }),
            })
        }
    };
    Ok(Metric {
        name: o.string("name")?,
        description: o.string("description")?,
        unit: o.string("unit")?,
        data,
    })
}

fn number_point(v: &Value, path: &str) -> R<NumberDataPoint> {
    use number_data_point::Value as V;
    let o = obj(v, path)?;
    let value = match o.one_of(&["asDouble", "asInt"])? {
        None => None,
        Some(("asDouble", v, p)) => Some(V::AsDouble(double(v, &p)?)),
        Some((_, v, p)) => Some(V::AsInt(int(v, &p)?)),
    };
    Ok(NumberDataPoint {
        attributes: o.list("attributes", key_value)?,
        start_time_unix_nano: o.u64("startTimeUnixNano")?,
        time_unix_nano: o.u64("timeUnixNano")?,
        value,
        flags: o.u32("flags")?,
    })
}

fn histogram_point(v: &Value, path: &str) -> R<HistogramDataPoint> {
    let o = obj(v, path)?;
    Ok(HistogramDataPoint {
        attributes: o.list("attributes", key_value)?,
        start_time_unix_nano: o.u64("startTimeUnixNano")?,
        time_unix_nano: o.u64("timeUnixNano")?,
        count: o.u64("count")?,
        sum: o.f64_opt("sum")?,
        bucket_counts: o.list("bucketCounts", int)?,
        explicit_bounds: o.list("explicitBounds", double)?,
        flags: o.u32("flags")?,
        min: o.f64_opt("min")?,
        max: o.f64_opt("max")?,
    })
}

fn buckets(v: &Value, path: &str) -> R<Buckets> {
    let o = obj(v, path)?;
    Ok(Buckets {
        offset: o.i32("offset")?,
        bucket_counts: o.list("bucketCounts", int)?,
    })
}

fn exponential_point(v: &Value, path: &str) -> R<ExponentialHistogramDataPoint> {
    let o = obj(v, path)?;
    Ok(ExponentialHistogramDataPoint {
        attributes: o.list("attributes", key_value)?,
        start_time_unix_nano: o.u64("startTimeUnixNano")?,
        time_unix_nano: o.u64("timeUnixNano")?,
        count: o.u64("count")?,
        sum: o.f64_opt("sum")?,
        scale: o.i32("scale")?,
        zero_count: o.u64("zeroCount")?,
        positive: o.message("positive", buckets)?,
        negative: o.message("negative", buckets)?,
        flags: o.u32("flags")?,
        min: o.f64_opt("min")?,
        max: o.f64_opt("max")?,
        zero_threshold: o.f64("zeroThreshold")?,
    })
}

fn summary_point(v: &Value, path: &str) -> R<SummaryDataPoint> {
    let o = obj(v, path)?;
    Ok(SummaryDataPoint {
        attributes: o.list("attributes", key_value)?,
        start_time_unix_nano: o.u64("startTimeUnixNano")?,
        time_unix_nano: o.u64("timeUnixNano")?,
        count: o.u64("count")?,
        sum: o.f64("sum")?,
        quantile_values: o.list("quantileValues", |v, p| {
            let q = obj(v, p)?;
            Ok(ValueAtQuantile {
                quantile: q.f64("quantile")?,
                value: q.f64("value")?,
            })
        })?,
        flags: o.u32("flags")?,
    })
}

// ---- logs ----

/// An `ExportLogsServiceRequest` in OTLP/JSON.
pub fn logs_request(v: &Value) -> R<ExportLogsServiceRequest> {
    Ok(ExportLogsServiceRequest {
        resource_logs: obj(v, "$")?.list("resourceLogs", |v, p| {
            let o = obj(v, p)?;
            Ok(ResourceLogs {
                resource: o.message("resource", resource)?,
                scope_logs: o.list("scopeLogs", |v, p| {
                    let o = obj(v, p)?;
                    Ok(ScopeLogs {
                        scope: o.message("scope", scope)?,
                        log_records: o.list("logRecords", log_record)?,
                    })
                })?,
            })
        })?,
    })
}

/// `SEVERITY_NUMBER_INFO`, `SEVERITY_NUMBER_WARN2`, …: 0 for unspecified, then four steps per
/// level from TRACE (1) to FATAL4 (24).
fn severity(v: &Value, path: &str) -> R<i32> {
    const LEVELS: [&str; 6] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"];
    let Value::String(s) = v else {
        return int(v, path);
    };
    if let Ok(n) = int(v, path) {
        return Ok(n);
    }
    let name = s.strip_prefix("SEVERITY_NUMBER_").unwrap_or(s);
    if name == "UNSPECIFIED" {
        return Ok(0);
    }
    let (level, step) = match name.char_indices().find(|(_, c)| c.is_ascii_digit()) {
        Some((i, _)) => (&name[..i], name[i..].parse::<i32>().ok()),
        None => (name, Some(1)),
    };
    match (LEVELS.iter().position(|l| *l == level), step) {
        (Some(l), Some(step @ 1..=4)) => Ok(l as i32 * 4 + step),
        _ => Err(format!("{path}: unknown severity `{s}`")),
    }
}

fn log_record(v: &Value, path: &str) -> R<LogRecord> {
    let o = obj(v, path)?;
    Ok(LogRecord {
        time_unix_nano: o.u64("timeUnixNano")?,
        observed_time_unix_nano: o.u64("observedTimeUnixNano")?,
        severity_number: o.message("severityNumber", severity)?.unwrap_or(0),
        severity_text: o.string("severityText")?,
        body: o.message("body", any_value)?,
        attributes: o.list("attributes", key_value)?,
        flags: o.u32("flags")?,
        trace_id: o.hex_bytes("traceId")?,
        span_id: o.hex_bytes("spanId")?,
        event_name: o.string("eventName")?,
    })
}
