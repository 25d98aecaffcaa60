//! OpenTelemetry (OTLP) metrics and logs, as protobuf or JSON, into Tally events.
//!
//! - Every metric data point becomes a `metric.sample` named after the metric, with the
//!   resource's and the point's attributes as labels (the point's win). Sums are counters
//!   whose `extra.temporality` says whether the value is an increment (`delta`, Claude Code's
//!   default) or a running total (`cumulative`); histograms and summaries keep their counts,
//!   buckets and quantiles in `extra`, with their sum as the value.
//! - Log records that are Claude Code events become typed events: `tool_result` →
//!   `tool.executed`, `api_request` → `agent.interacted` (tokens, cost, model), `api_error` →
//!   `agent.interacted` with status `error`. Every other record becomes a `metric.sample`
//!   counting one occurrence of the event, its attributes as labels, never dropped.
//!
//! A point or record that cannot become an event is refused on its own, with its path and
//! the reason (OTLP's `partial_success`); the others go on.

pub mod json;
pub mod pb;
pub mod wire;

use std::collections::BTreeMap;

use base64::Engine;
use chrono::{DateTime, Utc};
use prost::Message;
use serde_json::{json, Map, Value};

use crate::formats::expansion;
use crate::ingest::envelope::client_json;
use crate::ingest::values;
use crate::ingest::{ClientEvent, SampleEvent};
use pb::any_value::Value as Any;
use shared::events::{FieldError, MetricSample, SampleKind, MAX_LABELS};
use shared::rfc3339;

/// Most metric data points one request may carry.
pub const MAX_POINTS: usize = 50_000;
/// Most log records one request may carry.
pub const MAX_RECORDS: usize = 10_000;
/// Longest label value; longer attribute values of log records go to `extra` instead.
pub const MAX_LABEL_VALUE: usize = shared::events::MAX_LABEL_VALUE_LEN;
/// Longest text kept in a log event's details, metadata or extra (a prompt, tool parameters,
/// an API body…); longer ones are cut here and end with `…`.
pub const MAX_TEXT: usize = 8 * 1024;
/// Largest event one point or record may become (about; JSON), far below Kafka's message
/// limit; a larger one is refused on its own.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// The two OTLP/HTTP encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    /// From a `Content-Type` (`application/x-protobuf` or `application/json`).
    pub fn from_content_type(ct: &str) -> Option<Encoding> {
        match ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "application/x-protobuf" | "application/protobuf" => Some(Encoding::Protobuf),
            "application/json" => Some(Encoding::Json),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// One OTLP signal: its request and response messages, how a request becomes events, and
/// the names its answers use. OTLP/HTTP and OTLP/gRPC serve both signals through this.
pub trait Signal: Send + Sync + 'static {
    type Request: Message + Default + Send + 'static;
    type Response: Message + Default + Send + 'static;
    /// The collector's gRPC service.
    const SERVICE: &'static str;
    /// What the items of a request are called ("data points").
    const ITEMS: &'static str;
    /// The `source` label of the ingest metrics for events that came this way.
    const SOURCE: &'static str;
    /// The OTLP/JSON name of `partial_success`'s count.
    const JSON_REJECTED: &'static str;
    fn from_json(v: &Value) -> Result<Self::Request, String>;
    /// What an encoded request holds, counted on the wire (see [`wire`]).
    fn shape(raw: &[u8]) -> Result<wire::Shape, String>;
    /// The OTLP/JSON name of the request's list (`resourceMetrics`).
    const ROOT: &'static str;
    /// The request's events, or why it is refused whole. `now` stands in for items that
    /// carry no time at all.
    fn events(req: &Self::Request, now: DateTime<Utc>) -> Result<Converted, FieldError>;
    /// The answer when `rejected` items were refused.
    fn partial(rejected: i64, error_message: String) -> Self::Response;
}

/// `collector.metrics.v1.MetricsService`
pub struct Metrics;
/// `collector.logs.v1.LogsService`
pub struct Logs;

impl Signal for Metrics {
    type Request = pb::ExportMetricsServiceRequest;
    type Response = pb::ExportMetricsServiceResponse;
    const SERVICE: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    const ITEMS: &'static str = "data points";
    const SOURCE: &'static str = "otlp_metrics";
    const JSON_REJECTED: &'static str = "rejectedDataPoints";
    fn from_json(v: &Value) -> Result<Self::Request, String> {
        json::metrics_request(v)
    }
    fn shape(raw: &[u8]) -> Result<wire::Shape, String> {
        wire::Shape::metrics(raw)
    }
    const ROOT: &'static str = "resourceMetrics";
    fn events(req: &Self::Request, _now: DateTime<Utc>) -> Result<Converted, FieldError> {
        metric_events(req)
    }
    fn partial(rejected: i64, error_message: String) -> Self::Response {
        pb::ExportMetricsServiceResponse {
            partial_success: Some(pb::ExportMetricsPartialSuccess {
                rejected_data_points: rejected,
                error_message,
            }),
        }
    }
}

impl Signal for Logs {
    type Request = pb::ExportLogsServiceRequest;
    type Response = pb::ExportLogsServiceResponse;
    const SERVICE: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const ITEMS: &'static str = "log records";
    const SOURCE: &'static str = "otlp_logs";
    const JSON_REJECTED: &'static str = "rejectedLogRecords";
    fn from_json(v: &Value) -> Result<Self::Request, String> {
        json::logs_request(v)
    }
    fn shape(raw: &[u8]) -> Result<wire::Shape, String> {
        wire::Shape::logs(raw)
    }
    const ROOT: &'static str = "resourceLogs";
    fn events(req: &Self::Request, now: DateTime<Utc>) -> Result<Converted, FieldError> {
        log_events(req, now)
    }
    fn partial(rejected: i64, error_message: String) -> Self::Response {
        pb::ExportLogsServiceResponse {
            partial_success: Some(pb::ExportLogsPartialSuccess {
                rejected_log_records: rejected,
                error_message,
            }),
        }
    }
}

/// Why a request body was refused: it cannot be read (a 400), or it holds more than a
/// request may (a 413).
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Malformed(String),
    TooMany(FieldError),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Malformed(e) => f.write_str(e),
            DecodeError::TooMany(e) => write!(f, "{}: {}", e.field, e.reason),
        }
    }
}

/// A request body of the signal in either encoding, its size bounded before it is decoded
/// (see [`wire`] and [`values::over_limit`]).
pub fn decode<S: Signal>(body: &[u8], encoding: Encoding) -> Result<S::Request, DecodeError> {
    match encoding {
        Encoding::Protobuf => {
            check_protobuf::<S>(body)?;
            S::Request::decode(body)
                .map_err(|e| DecodeError::Malformed(format!("invalid protobuf: {e}")))
        }
        Encoding::Json => {
            if let Some(bytes) = values::over_limit(body) {
                return Err(DecodeError::TooMany(FieldError::new(
                    S::ROOT,
                    format!(
                        "{} (send larger batches as protobuf)",
                        values::too_big(bytes)
                    ),
                )));
            }
            if values::holds_reserved(body) {
                return Err(DecodeError::Malformed(values::reserved()));
            }
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| DecodeError::Malformed(format!("invalid JSON: {e}")))?;
            S::from_json(&v).map_err(DecodeError::Malformed)
        }
    }
}

/// Counts an encoded request on the wire and refuses it before prost allocates anything
/// when it holds more than a request may. OTLP/gRPC calls it before tonic decodes.
pub fn check_protobuf<S: Signal>(raw: &[u8]) -> Result<(), DecodeError> {
    let shape =
        S::shape(raw).map_err(|e| DecodeError::Malformed(format!("invalid protobuf: {e}")))?;
    shape.check(S::ROOT).map_err(DecodeError::TooMany)
}

/// The answer to an export: empty when everything was taken, else a partial success.
pub fn response<S: Signal>(out: &Converted) -> S::Response {
    if out.rejected.is_empty() {
        S::Response::default()
    } else {
        S::partial(out.rejected.len() as i64, out.summary())
    }
}

/// [`response`] in the request's encoding.
pub fn encode_response<S: Signal>(out: &Converted, encoding: Encoding) -> Vec<u8> {
    match (encoding, out.rejected.is_empty()) {
        (Encoding::Protobuf, _) => response::<S>(out).encode_to_vec(),
        (Encoding::Json, true) => b"{}".to_vec(),
        // 64-bit integers are strings in OTLP/JSON.
        (Encoding::Json, false) => json!({"partialSuccess": {
            S::JSON_REJECTED: out.rejected.len().to_string(),
            "errorMessage": out.summary()}})
        .to_string()
        .into_bytes(),
    }
}

/// What a request became: the client events to append (with the point or record each came
/// from) and the points or records refused, one entry each.
#[derive(Debug, Default)]
pub struct Converted {
    pub events: Vec<ClientEvent>,
    pub origins: Vec<Origin>,
    pub rejected: Vec<FieldError>,
}

/// The point or record of a request an event came from; written out as its path
/// (`resourceMetrics[0].scopeMetrics[0].metrics[2].dataPoints[7]`) only when the event is
/// refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A metric's data point: resource, scope, metric and point.
    Point([usize; 4]),
    /// A log record: resource, scope and record.
    Record([usize; 3]),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Point([r, s, m, p]) => write!(
                f,
                "resourceMetrics[{r}].scopeMetrics[{s}].metrics[{m}].dataPoints[{p}]"
            ),
            Origin::Record([r, s, l]) => {
                write!(f, "resourceLogs[{r}].scopeLogs[{s}].logRecords[{l}]")
            }
        }
    }
}

impl Converted {
    /// Keeps an event, or refuses it when it is too large to be one.
    fn push(&mut self, origin: Origin, event: ClientEvent) {
        let size = match &event {
            ClientEvent::Json(v) => approx_size(v),
            ClientEvent::Sample(s) => sample_size(s),
        };
        if size > MAX_EVENT_BYTES {
            self.rejected.push(FieldError::new(
                origin.to_string(),
                format!("it makes an event of about {size} bytes; at most {MAX_EVENT_BYTES}"),
            ));
        } else {
            self.events.push(event);
            self.origins.push(origin);
        }
    }

    /// The `error_message` of a partial success: how many, and the first few reasons.
    pub fn summary(&self) -> String {
        let mut msg = format!("{} rejected", self.rejected.len());
        for e in self.rejected.iter().take(5) {
            msg.push_str(&format!("; {}: {}", e.field, e.reason));
        }
        if self.rejected.len() > 5 {
            msg.push_str("; …");
        }
        msg
    }
}

/// About how many bytes a JSON value takes (without serializing it).
fn approx_size(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(a) => 2 + a.iter().map(|v| approx_size(v) + 1).sum::<usize>(),
        Value::Object(o) => object_size(o.iter().map(|(k, v)| (k.as_str(), approx_size(v)))),
    }
}

/// [`approx_size`] of an object whose entries are `(key, approx_size of the value)`.
fn object_size<'a>(entries: impl Iterator<Item = (&'a str, usize)>) -> usize {
    2 + entries.map(|(k, size)| k.len() + 4 + size).sum::<usize>()
}

/// [`approx_size`] of the sample's [`SampleEvent::into_json`], without building it.
fn sample_size(e: &SampleEvent) -> usize {
    let s = &e.sample;
    let text = |t: &str| t.len() + 2;
    let labels = object_size(s.labels.iter().map(|(k, v)| (k.as_str(), text(v))));
    let extra = object_size(s.extra.iter().map(|(k, v)| (k.as_str(), approx_size(v))));
    let data = object_size(
        [
            ("name", text(&s.name)),
            ("labels", labels),
            ("value", 8),
            ("kind", text(s.kind.as_str())),
            ("extra", extra),
        ]
        .into_iter(),
    );
    object_size(
        [
            ("type", text("metric.sample")),
            ("occurred_at", rfc3339::rfc3339_len(&e.at) + 2),
            ("data", data),
        ]
        .into_iter(),
    )
}

/// Cuts every text in `v` longer than [`MAX_TEXT`] bytes, ending it with `…`.
fn clip(v: &mut Value) {
    match v {
        Value::String(s) if s.len() > MAX_TEXT => {
            let mut end = MAX_TEXT;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push('…');
        }
        Value::Array(a) => a.iter_mut().for_each(clip),
        Value::Object(o) => o.values_mut().for_each(clip),
        _ => {}
    }
}

/// An attribute value as a label: strings as they are, everything else as its JSON text.
fn label_text(v: Option<&pb::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        None => String::new(),
        Some(_) => attr_json(v).to_string(),
    }
}

/// An attribute value as JSON (bytes in base64).
fn attr_json(v: Option<&pb::AnyValue>) -> Value {
    match v.and_then(|v| v.value.as_ref()) {
        None => Value::Null,
        Some(Any::StringValue(s)) => Value::from(s.as_str()),
        Some(Any::BoolValue(b)) => Value::from(*b),
        Some(Any::IntValue(i)) => Value::from(*i),
        Some(Any::DoubleValue(d)) => {
            serde_json::Number::from_f64(*d).map_or(Value::from(d.to_string()), Value::Number)
        }
        Some(Any::ArrayValue(a)) => {
            Value::Array(a.values.iter().map(|v| attr_json(Some(v))).collect())
        }
        Some(Any::KvlistValue(l)) => Value::Object(
            l.values
                .iter()
                .map(|kv| (kv.key.clone(), attr_json(kv.value.as_ref())))
                .collect(),
        ),
        Some(Any::BytesValue(b)) => {
            Value::from(base64::engine::general_purpose::STANDARD.encode(b))
        }
    }
}

fn nanos_to_time(nanos: u64) -> Option<DateTime<Utc>> {
    (nanos > 0)
        .then(|| i64::try_from(nanos).ok())
        .flatten()
        .map(DateTime::from_timestamp_nanos)
}

fn finite(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn temporality(t: i32) -> &'static str {
    match t {
        pb::TEMPORALITY_DELTA => "delta",
        pb::TEMPORALITY_CUMULATIVE => "cumulative",
        _ => "unspecified",
    }
}

/// What every kind of data point has.
trait DataPoint {
    fn attributes(&self) -> &[pb::KeyValue];
    fn start(&self) -> u64;
    fn time(&self) -> u64;
    fn flags(&self) -> u32;
}

macro_rules! data_points {
    ($($t:ty),*) => {$(
        impl DataPoint for $t {
            fn attributes(&self) -> &[pb::KeyValue] {
                &self.attributes
            }
            fn start(&self) -> u64 {
                self.start_time_unix_nano
            }
            fn time(&self) -> u64 {
                self.time_unix_nano
            }
            fn flags(&self) -> u32 {
                self.flags
            }
        }
    )*};
}

data_points!(
    pb::NumberDataPoint,
    pb::HistogramDataPoint,
    pb::ExponentialHistogramDataPoint,
    pb::SummaryDataPoint
);

fn point_base<'a>(metric: [usize; 3], i: usize, p: &'a dyn DataPoint) -> PointBase<'a> {
    let [r, s, m] = metric;
    PointBase {
        origin: Origin::Point([r, s, m, i]),
        attributes: p.attributes(),
        start: p.start(),
        time: p.time(),
        flags: p.flags(),
    }
}

/// The common part of every data point: its labels and time.
struct PointBase<'a> {
    origin: Origin,
    attributes: &'a [pb::KeyValue],
    start: u64,
    time: u64,
    flags: u32,
}

/// Turns a metrics request into `metric.sample`s, or refuses it whole when it carries more
/// points than [`MAX_POINTS`].
pub fn metric_events(req: &pb::ExportMetricsServiceRequest) -> Result<Converted, FieldError> {
    use pb::metric::Data;
    // Points and about how large they become, each with its resource's attributes.
    let (mut points, mut expanded) = (0, 0);
    for rm in &req.resource_metrics {
        let resource = repeated(rm.resource.as_ref());
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            // A metric without data counts as one refused point.
            let (n, bytes) = metric_points(m);
            let n = n.max(1);
            points += n;
            let shared = expansion::Shared {
                bytes: resource.bytes + m.name.len(),
                ..resource
            };
            // Claude Code's session starts become a `session.started` besides their sample,
            // carrying the same attributes: weighed twice.
            let copies = if m.name == SESSION_COUNT { 2 } else { 1 };
            expanded += copies * (bytes + expansion::weight(n, shared));
        }
    }
    if points > MAX_POINTS {
        return Err(FieldError::new(
            "resourceMetrics",
            format!("{points} data points; at most {MAX_POINTS} per request"),
        ));
    }
    check_expansion("resourceMetrics", expanded)?;
    let mut out = Converted::default();
    let mut sessions = Vec::new();
    for (ri, rm) in req.resource_metrics.iter().enumerate() {
        let resource: &[pb::KeyValue] = rm.resource.as_ref().map_or(&[], |r| &r.attributes);
        for (si, sm) in rm.scope_metrics.iter().enumerate() {
            for (mi, m) in sm.metrics.iter().enumerate() {
                // Written out only for a refusal: most metrics carry a few points.
                let path = || format!("resourceMetrics[{ri}].scopeMetrics[{si}].metrics[{mi}]");
                if m.name.is_empty() {
                    // Every point of a nameless metric is refused.
                    let n = metric_points(m).0.max(1);
                    out.rejected.extend(
                        (0..n).map(|_| FieldError::new(format!("{}.name", path()), "is required")),
                    );
                    continue;
                }
                let scope = sm.scope.as_ref().map_or("", |s| s.name.as_str());
                let mut sample = |base: PointBase, kind: SampleKind, value: f64, extra: Value| {
                    match sample_event(m, scope, resource, &base, kind, value, extra) {
                        Ok(Some(e)) => out.push(base.origin, e),
                        Ok(None) => {}
                        Err(e) => out.rejected.push(e),
                    }
                };
                match &m.data {
                    None => out.rejected.push(FieldError::new(
                        path(),
                        "no data: one of gauge, sum, histogram, exponentialHistogram or summary",
                    )),
                    Some(Data::Gauge(g)) => {
                        for (i, p) in g.data_points.iter().enumerate() {
                            let b = point_base([ri, si, mi], i, p);
                            match number(p) {
                                Some(v) => sample(b, SampleKind::Gauge, v, json!({})),
                                None => sample(b, SampleKind::Gauge, f64::NAN, json!({})),
                            }
                        }
                    }
                    Some(Data::Sum(s)) => {
                        let extra = json!({"temporality": temporality(s.aggregation_temporality),
                                           "monotonic": s.is_monotonic});
                        // Claude Code counts session starts; as increments, each one is a
                        // session start the dashboards count too.
                        let starts = m.name == SESSION_COUNT
                            && s.aggregation_temporality == pb::TEMPORALITY_DELTA;
                        for (i, p) in s.data_points.iter().enumerate() {
                            let b = point_base([ri, si, mi], i, p);
                            let value = number(p).unwrap_or(f64::NAN);
                            sample(b, SampleKind::Counter, value, extra.clone());
                            if starts {
                                if let Some(e) = session_started(resource, p) {
                                    sessions.push((Origin::Point([ri, si, mi, i]), e));
                                }
                            }
                        }
                    }
                    Some(Data::Histogram(h)) => {
                        for (i, p) in h.data_points.iter().enumerate() {
                            let b = point_base([ri, si, mi], i, p);
                            let extra = json!({
                                "temporality": temporality(h.aggregation_temporality),
                                "count": p.count, "sum": p.sum.map(finite),
                                "min": p.min.map(finite), "max": p.max.map(finite),
                                "explicit_bounds": p.explicit_bounds.iter().map(|b| finite(*b)).collect::<Vec<_>>(),
                                "bucket_counts": p.bucket_counts,
                            });
                            sample(b, SampleKind::Histogram, p.sum.unwrap_or(0.0), extra);
                        }
                    }
                    Some(Data::ExponentialHistogram(h)) => {
                        for (i, p) in h.data_points.iter().enumerate() {
                            let b = point_base([ri, si, mi], i, p);
                            let side = |b: &Option<pb::Buckets>| {
                                b.as_ref().map(|b| json!({"offset": b.offset, "bucket_counts": b.bucket_counts}))
                            };
                            let extra = json!({
                                "temporality": temporality(h.aggregation_temporality),
                                "count": p.count, "sum": p.sum.map(finite),
                                "min": p.min.map(finite), "max": p.max.map(finite),
                                "scale": p.scale, "zero_count": p.zero_count,
                                "zero_threshold": finite(p.zero_threshold),
                                "positive": side(&p.positive), "negative": side(&p.negative),
                            });
                            sample(b, SampleKind::Histogram, p.sum.unwrap_or(0.0), extra);
                        }
                    }
                    Some(Data::Summary(s)) => {
                        for (i, p) in s.data_points.iter().enumerate() {
                            let b = point_base([ri, si, mi], i, p);
                            let extra = json!({
                                "count": p.count,
                                "quantiles": p.quantile_values.iter()
                                    .map(|q| json!({"quantile": finite(q.quantile), "value": finite(q.value)}))
                                    .collect::<Vec<_>>(),
                            });
                            sample(b, SampleKind::Summary, p.sum, extra);
                        }
                    }
                }
            }
        }
    }
    for (origin, e) in sessions {
        out.push(origin, ClientEvent::Json(e));
    }
    Ok(out)
}

/// Claude Code's count of session starts: as delta increments, each point is also a
/// `session.started` ([`session_started`]).
const SESSION_COUNT: &str = "claude_code.session.count";

/// What each point or record of a resource repeats: its attributes.
fn repeated(resource: Option<&pb::Resource>) -> expansion::Shared {
    resource.map_or_else(Default::default, |r| expansion::Shared {
        bytes: r.encoded_len(),
        entries: r.attributes.len(),
    })
}

/// How many messages, and their size on the wire.
fn sized<M: Message>(messages: &[M]) -> (usize, usize) {
    (
        messages.len(),
        messages.iter().map(Message::encoded_len).sum(),
    )
}

fn check_expansion(field: &str, expanded: usize) -> Result<(), FieldError> {
    expansion::check(
        field,
        expanded,
        "each point carries its resource's attributes",
    )
}

/// A `session.started` for a delta point of `claude_code.session.count` that names its
/// session; the point's other attributes (`start_type`, terminal, version…) are its context.
fn session_started(resource: &[pb::KeyValue], p: &pb::NumberDataPoint) -> Option<Value> {
    if p.flags & pb::FLAG_NO_RECORDED_VALUE != 0 || number(p).is_none_or(|n| n < 1.0) {
        return None;
    }
    let at = nanos_to_time(p.time_unix_nano)?;
    let mut attrs = Attrs(
        resource
            .iter()
            .chain(&p.attributes)
            .map(|kv| (kv.key.clone(), attr_json(kv.value.as_ref())))
            .collect(),
    );
    attrs.peek_string("session.id")?;
    let mut data = attrs.identity();
    data.insert("context".into(), Value::Object(attrs.0));
    Some(client_json("session.started", &at, data))
}

/// A metric's data points: how many, and their size on the wire.
fn metric_points(m: &pb::Metric) -> (usize, usize) {
    use pb::metric::Data;
    match &m.data {
        Some(Data::Gauge(g)) => sized(&g.data_points),
        Some(Data::Sum(s)) => sized(&s.data_points),
        Some(Data::Histogram(h)) => sized(&h.data_points),
        Some(Data::ExponentialHistogram(h)) => sized(&h.data_points),
        Some(Data::Summary(s)) => sized(&s.data_points),
        None => (0, 0),
    }
}

fn number(p: &pb::NumberDataPoint) -> Option<f64> {
    match p.value? {
        pb::number_data_point::Value::AsDouble(d) => Some(d),
        pb::number_data_point::Value::AsInt(i) => Some(i as f64),
    }
}

/// One data point as a `metric.sample`; `None` for a point that marks a gap
/// (`NO_RECORDED_VALUE`), which carries no measurement.
fn sample_event(
    m: &pb::Metric,
    scope: &str,
    resource: &[pb::KeyValue],
    base: &PointBase,
    kind: SampleKind,
    value: f64,
    mut extra: Value,
) -> Result<Option<ClientEvent>, FieldError> {
    if base.flags & pb::FLAG_NO_RECORDED_VALUE != 0 {
        return Ok(None);
    }
    let err = |reason: String| FieldError::new(base.origin.to_string(), reason);
    if !value.is_finite() {
        return Err(err("the point has no finite value".into()));
    }
    let at = nanos_to_time(base.time)
        .ok_or_else(|| err("timeUnixNano is missing or out of range".into()))?;
    let mut labels = BTreeMap::new();
    for kv in resource.iter().chain(base.attributes) {
        labels.insert(kv.key.clone(), label_text(kv.value.as_ref()));
    }
    if labels.len() > MAX_LABELS {
        return Err(err(format!(
            "{} attributes with the resource's; at most {MAX_LABELS}",
            labels.len()
        )));
    }
    let x = extra.as_object_mut().expect("extra is an object");
    if !m.unit.is_empty() {
        x.insert("unit".into(), Value::from(m.unit.as_str()));
    }
    if !scope.is_empty() {
        x.insert("scope".into(), Value::from(scope));
    }
    if let Some(start) = nanos_to_time(base.start) {
        x.insert(
            "start_time".into(),
            Value::from(rfc3339::to_rfc3339(&start)),
        );
    }
    x.retain(|_, v| !v.is_null());
    let Value::Object(extra) = extra else {
        unreachable!("extra is an object")
    };
    Ok(Some(sample(at, m.name.clone(), labels, value, kind, extra)))
}

// ---- logs ----

/// A log record's attributes (the resource's, then the record's), read leniently: Claude
/// Code sends numbers as numbers in recent versions and as strings in older ones, and
/// booleans as `"true"`/`"false"`.
struct Attrs(Map<String, Value>);

impl Attrs {
    fn take(&mut self, k: &str) -> Option<Value> {
        self.0.remove(k).filter(|v| !v.is_null())
    }

    fn string(&mut self, k: &str) -> Option<String> {
        match self.take(k)? {
            Value::String(s) => Some(s),
            other => Some(other.to_string()),
        }
        .filter(|s| !s.is_empty())
    }

    fn peek_string(&self, k: &str) -> Option<&str> {
        self.0
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    fn float(&mut self, k: &str) -> Option<f64> {
        match self.0.get(k)? {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .inspect(|_| {
            self.0.remove(k);
        })
    }

    fn int(&mut self, k: &str) -> i64 {
        self.float(k).map_or(0, |f| f.round() as i64)
    }

    fn boolean(&mut self, k: &str) -> Option<bool> {
        match self.0.get(k)? {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        }
        .inspect(|_| {
            self.0.remove(k);
        })
    }

    /// Who and where: the fields every typed event shares.
    fn identity(&mut self) -> Map<String, Value> {
        let mut id = Map::new();
        let user = ["user.id", "user.email", "user.account_uuid"]
            .iter()
            .find_map(|k| self.peek_string(k).map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        self.0.remove("user.id");
        id.insert("user_id".into(), Value::from(user));
        id.insert(
            "session_id".into(),
            Value::from(
                self.string("session.id")
                    .unwrap_or_else(|| "unknown".into()),
            ),
        );
        for (attr, field) in [("team.id", "team_id"), ("project.id", "project_id")] {
            if let Some(v) = self.string(attr) {
                id.insert(field.into(), Value::from(v));
            }
        }
        id
    }
}

/// Turns a logs request into events, or refuses it whole when it carries more records than
/// [`MAX_RECORDS`]. `now` stands in for records that carry no time at all.
pub fn log_events(
    req: &pb::ExportLogsServiceRequest,
    now: DateTime<Utc>,
) -> Result<Converted, FieldError> {
    let (mut records, mut expanded) = (0, 0);
    for rl in &req.resource_logs {
        let resource = repeated(rl.resource.as_ref());
        for sl in &rl.scope_logs {
            let (n, bytes) = sized(&sl.log_records);
            records += n;
            expanded += bytes + expansion::weight(n, resource);
        }
    }
    if records > MAX_RECORDS {
        return Err(FieldError::new(
            "resourceLogs",
            format!("{records} log records; at most {MAX_RECORDS} per request"),
        ));
    }
    check_expansion("resourceLogs", expanded)?;
    let mut out = Converted::default();
    for (ri, rl) in req.resource_logs.iter().enumerate() {
        let resource: &[pb::KeyValue] = rl.resource.as_ref().map_or(&[], |r| &r.attributes);
        for (si, sl) in rl.scope_logs.iter().enumerate() {
            let scope = sl.scope.as_ref().map_or("", |s| s.name.as_str());
            for (li, r) in sl.log_records.iter().enumerate() {
                out.push(
                    Origin::Record([ri, si, li]),
                    log_event(resource, scope, r, now),
                );
            }
        }
    }
    Ok(out)
}

fn log_event(
    resource: &[pb::KeyValue],
    scope: &str,
    r: &pb::LogRecord,
    now: DateTime<Utc>,
) -> ClientEvent {
    let mut attrs = Attrs(
        resource
            .iter()
            .chain(&r.attributes)
            .map(|kv| {
                let mut v = attr_json(kv.value.as_ref());
                clip(&mut v);
                (kv.key.clone(), v)
            })
            .collect(),
    );
    let mut body = attr_json(r.body.as_ref());
    clip(&mut body);
    let body_name = body
        .as_str()
        .filter(|s| !s.is_empty() && s.len() <= 255 && !s.contains(char::is_whitespace));
    let name = attrs
        .peek_string("event.name")
        .or((!r.event_name.is_empty()).then_some(r.event_name.as_str()))
        .or(body_name)
        .map(str::to_string);
    let body_name = body_name.map(str::to_string);
    let claude = scope.starts_with("com.anthropic.claude_code")
        || attrs
            .peek_string("service.name")
            .is_some_and(|s| s.starts_with("claude-code"))
        || name
            .as_deref()
            .is_some_and(|n| n.starts_with("claude_code."));
    let short = name
        .as_deref()
        .map(|n| n.strip_prefix("claude_code.").unwrap_or(n).to_string());
    let at = nanos_to_time(r.time_unix_nano)
        .or_else(|| nanos_to_time(r.observed_time_unix_nano))
        .or_else(|| {
            attrs
                .peek_string("event.timestamp")
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
        })
        .unwrap_or(now);
    if claude {
        attrs.0.remove("event.name");
        match short.as_deref() {
            Some("tool_result") => return ClientEvent::Json(tool_result(attrs, at)),
            Some("api_request") => return ClientEvent::Json(api_call(attrs, at, false)),
            Some("api_error") => return ClientEvent::Json(api_call(attrs, at, true)),
            _ => {}
        }
    }
    let sample_name = match (&short, claude) {
        (Some(s), true) => format!("claude_code.{s}"),
        (Some(_), false) => name.clone().unwrap_or_default(),
        (None, _) => "log.record".into(),
    };
    let body_is_name = body_name.is_some();
    generic_event(attrs, at, sample_name, r, body, body_is_name)
}

/// A `metric.sample`, built typed around its labels and extras.
fn sample(
    at: DateTime<Utc>,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
    kind: SampleKind,
    extra: Map<String, Value>,
) -> ClientEvent {
    ClientEvent::Sample(SampleEvent {
        at,
        sample: MetricSample {
            name,
            labels,
            value,
            kind,
            extra,
        },
    })
}

/// `claude_code.tool_result` → `tool.executed`.
fn tool_result(mut a: Attrs, at: DateTime<Utc>) -> Value {
    let mut d = a.identity();
    d.insert(
        "tool_name".into(),
        Value::from(a.string("tool_name").unwrap_or_else(|| "unknown".into())),
    );
    d.insert("duration_ms".into(), Value::from(a.int("duration_ms")));
    let error = a.string("error").or_else(|| a.string("error_type"));
    let success = a.boolean("success").unwrap_or(error.is_none());
    d.insert("success".into(), Value::from(success));
    if let Some(e) = error {
        d.insert("error_message".into(), Value::from(e));
    }
    d.insert("details".into(), Value::Object(a.0));
    client_json("tool.executed", &at, d)
}

/// `claude_code.api_request` / `api_error` → `agent.interacted`.
fn api_call(mut a: Attrs, at: DateTime<Utc>, failed: bool) -> Value {
    let mut d = a.identity();
    let agent = a
        .peek_string("service.name")
        .unwrap_or("claude-code")
        .to_string();
    d.insert("agent_name".into(), Value::from(agent));
    d.insert(
        "interaction_type".into(),
        Value::from(if failed { "api_error" } else { "api_request" }),
    );
    for (attr, field) in [
        ("input_tokens", "input_tokens"),
        ("output_tokens", "output_tokens"),
        ("cache_read_tokens", "cache_read_tokens"),
        ("cache_creation_tokens", "cache_creation_tokens"),
        ("duration_ms", "duration_ms"),
    ] {
        d.insert(field.into(), Value::from(a.int(attr)));
    }
    if let Some(model) = a.string("model") {
        d.insert("model".into(), Value::from(model));
    }
    if let Some(cost) = a.float("cost_usd") {
        d.insert("cost_usd".into(), finite(cost));
    }
    d.insert(
        "status".into(),
        Value::from(if failed { "error" } else { "success" }),
    );
    if failed {
        let msg = a.string("error").unwrap_or_else(|| "API error".into());
        d.insert("error_message".into(), Value::from(msg));
    }
    d.insert("metadata".into(), Value::Object(a.0));
    client_json("agent.interacted", &at, d)
}

/// Any other record: one occurrence of the event as a `metric.sample`. Short attribute
/// values are labels; long ones (a prompt, when its logging is on), the body and the
/// severity go to `extra`.
fn generic_event(
    a: Attrs,
    at: DateTime<Utc>,
    name: String,
    r: &pb::LogRecord,
    body: Value,
    body_is_name: bool,
) -> ClientEvent {
    let mut labels = BTreeMap::new();
    let mut extra = Map::new();
    for (k, v) in a.0 {
        let text = match &v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if labels.len() < MAX_LABELS
            && !k.is_empty()
            && k.chars().count() <= shared::events::MAX_NAME_LEN
            && text.chars().count() <= MAX_LABEL_VALUE
        {
            labels.insert(k, text);
        } else {
            extra.insert(k, v);
        }
    }
    if !body.is_null() && !body_is_name {
        extra.insert("body".into(), body);
    }
    if !r.severity_text.is_empty() {
        extra.insert("severity".into(), Value::from(r.severity_text.as_str()));
    }
    if r.severity_number != 0 {
        extra.insert("severity_number".into(), Value::from(r.severity_number));
    }
    sample(at, name, labels, 1.0, SampleKind::Counter, extra)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{IngestContext, TimeBounds};
    use shared::events::{Actor, Source};
    use shared::tenant::TenantId;

    const METRICS_JSON: &str =
        include_str!("../../../tests/fixtures/otlp/claude_code_metrics.json");
    const METRICS_PB: &[u8] = include_bytes!("../../../tests/fixtures/otlp/claude_code_metrics.pb");
    const SNAKE_JSON: &str = include_str!("../../../tests/fixtures/otlp/snake_case_metrics.json");
    const SNAKE_PB: &[u8] = include_bytes!("../../../tests/fixtures/otlp/snake_case_metrics.pb");
    const LOGS_JSON: &str = include_str!("../../../tests/fixtures/otlp/claude_code_logs.json");
    const LOGS_PB: &[u8] = include_bytes!("../../../tests/fixtures/otlp/claude_code_logs.pb");

    /// The events of a conversion as a client would send them to the JSON door.
    fn json_events(out: &Converted) -> Vec<Value> {
        out.events
            .iter()
            .cloned()
            .map(ClientEvent::into_json)
            .collect()
    }

    /// Every event a conversion makes must pass the same validation as any client's event,
    /// and become the same envelope as it would sent to the JSON door; a sample is sized as
    /// its JSON is.
    fn envelopes(out: &Converted) -> Vec<shared::events::Envelope> {
        let ctx = IngestContext {
            tenant_id: TenantId::new(),
            actor: Actor::default(),
            source: Source::Otlp,
            received_at: Utc::now(),
            bounds: TimeBounds {
                retention: chrono::Duration::days(3650),
                ..TimeBounds::default()
            },
            ids: crate::ingest::Ids::Content,
        };
        let mut envelopes = Vec::new();
        for (i, e) in out.events.iter().enumerate() {
            if let ClientEvent::Sample(s) = e {
                let size = approx_size(&e.clone().into_json());
                assert_eq!(sample_size(s), size, "sized as its JSON");
            }
            let env = crate::ingest::envelope::written(
                &ctx.client_envelope(i, e.clone()).expect("a valid event"),
            );
            let json = ctx
                .envelope(i, e.clone().into_json())
                .map(|e| crate::ingest::envelope::written(&e.map_data(crate::ingest::Data::Json)));
            assert_eq!(Ok(&env), json.as_ref(), "as the JSON door stamps it");
            envelopes.push(env);
        }
        envelopes
    }

    /// The fixtures' protobuf twins were written by the reference implementation
    /// (`make_pb.py`): the JSON and the protobuf decoders must read the very same request.
    #[test]
    fn json_and_protobuf_decode_to_the_same_request() {
        for (json, pb) in [(METRICS_JSON, METRICS_PB), (SNAKE_JSON, SNAKE_PB)] {
            let from_json = decode::<Metrics>(json.as_bytes(), Encoding::Json).unwrap();
            let from_pb = decode::<Metrics>(pb, Encoding::Protobuf).unwrap();
            assert_eq!(from_json, from_pb);
        }
        let from_json = decode::<Logs>(LOGS_JSON.as_bytes(), Encoding::Json).unwrap();
        let from_pb = decode::<Logs>(LOGS_PB, Encoding::Protobuf).unwrap();
        assert_eq!(from_json, from_pb);
    }

    #[test]
    fn json_keeps_64_bit_integers_and_every_point_kind() {
        use pb::metric::Data;
        let req = decode::<Metrics>(METRICS_JSON.as_bytes(), Encoding::Json).unwrap();
        let metrics = &req.resource_metrics[0].scope_metrics[0].metrics;
        assert_eq!(metrics.len(), 7);
        let Some(Data::Gauge(g)) = &metrics[3].data else {
            panic!("a gauge")
        };
        // 2^53 + 1: a JSON number would have lost it.
        assert_eq!(
            g.data_points[0].value,
            Some(pb::number_data_point::Value::AsInt(9_007_199_254_740_993))
        );
        assert_eq!(g.data_points[0].time_unix_nano, 1_764_115_200_000_000_000);
        let Some(Data::Histogram(h)) = &metrics[4].data else {
            panic!("a histogram")
        };
        assert_eq!(h.data_points[0].bucket_counts, vec![1, 2, 3]);
        assert_eq!(h.data_points[0].explicit_bounds, vec![10.0, 50.0]);
        assert_eq!(h.aggregation_temporality, pb::TEMPORALITY_CUMULATIVE);
        let Some(Data::ExponentialHistogram(e)) = &metrics[5].data else {
            panic!("an exponential histogram")
        };
        assert_eq!(e.data_points[0].scale, -2);
        assert_eq!(e.data_points[0].positive.as_ref().unwrap().offset, -1);
        let Some(Data::Summary(s)) = &metrics[6].data else {
            panic!("a summary")
        };
        assert_eq!(s.data_points[0].quantile_values[1].value, 12.0);
    }

    #[test]
    fn claude_code_metrics_become_samples_with_their_attributes() {
        let req = decode::<Metrics>(METRICS_PB, Encoding::Protobuf).unwrap();
        let out = metric_events(&req).unwrap();
        let ev = json_events(&out);
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        assert_eq!(out.events.len(), 7);
        let tokens = &ev[0];
        assert_eq!(tokens["type"], "metric.sample");
        assert_eq!(tokens["occurred_at"], "2025-11-26T00:00:00+00:00");
        let d = &tokens["data"];
        assert_eq!(d["name"], "claude_code.token.usage");
        assert_eq!(d["value"], 1520.0);
        assert_eq!(d["kind"], "counter");
        assert_eq!(d["labels"]["type"], "input");
        assert_eq!(d["labels"]["user.id"], "u-1f3a");
        assert_eq!(d["labels"]["session.id"], "s-77");
        assert_eq!(
            d["labels"]["service.name"], "claude-code",
            "resource attributes too"
        );
        assert_eq!(d["extra"]["temporality"], "delta");
        assert_eq!(d["extra"]["unit"], "tokens");
        assert_eq!(d["extra"]["start_time"], "2025-11-25T23:59:00+00:00");
        let gauge = &ev[3]["data"];
        assert_eq!(gauge["labels"]["flag"], "true");
        assert_eq!(gauge["labels"]["n"], "-42");
        assert_eq!(gauge["labels"]["ratio"], "0.5");
        assert_eq!(gauge["kind"], "gauge");
        let hist = &ev[4]["data"];
        assert_eq!(hist["kind"], "histogram");
        assert_eq!(hist["value"], 123.5);
        assert_eq!(hist["extra"]["count"], 6);
        assert_eq!(hist["extra"]["bucket_counts"], json!([1, 2, 3]));
        assert_eq!(hist["extra"]["temporality"], "cumulative");
        let exp = &ev[5]["data"];
        assert_eq!(
            exp["extra"]["positive"],
            json!({"offset": -1, "bucket_counts": [2, 1]})
        );
        let summary = &ev[6]["data"];
        assert_eq!(summary["kind"], "summary");
        assert_eq!(
            summary["extra"]["quantiles"][0],
            json!({"quantile": 0.5, "value": 3.5})
        );
        let envs = envelopes(&out);
        let p = envs[0].payload().unwrap();
        let shared::events::Payload::MetricSample(p) = p else {
            panic!("a sample")
        };
        // The projector files it under the user and session of its attributes.
        assert_eq!(p.labels["user.id"], "u-1f3a");
    }

    #[test]
    fn claude_code_session_counts_start_sessions() {
        let doc = json!({"resourceMetrics": [{
            "resource": {"attributes": [{"key": "team.id", "value": {"stringValue": "platform"}}]},
            "scopeMetrics": [{"metrics": [
                {"name": "claude_code.session.count", "sum": {"aggregationTemporality": 1,
                 "isMonotonic": true, "dataPoints": [
                    {"timeUnixNano": "1764115200000000000", "asInt": "1", "attributes": [
                        {"key": "session.id", "value": {"stringValue": "s-1"}},
                        {"key": "user.id", "value": {"stringValue": "u-1"}},
                        {"key": "start_type", "value": {"stringValue": "resume"}}]},
                    {"timeUnixNano": "1764115200000000000", "asInt": "1", "attributes": []}]}},
                {"name": "claude_code.session.count", "sum": {"aggregationTemporality": 2,
                 "dataPoints": [{"timeUnixNano": "1764115200000000000", "asInt": "4",
                     "attributes": [{"key": "session.id", "value": {"stringValue": "s-2"}}]}]}}]}]}]});
        let out = metric_events(&json::metrics_request(&doc).unwrap()).unwrap();
        let ev = json_events(&out);
        // Three samples, and one session start: the delta point that names its session.
        assert_eq!(out.events.len(), 4, "{:?}", ev);
        let start = &ev[3];
        assert_eq!(start["type"], "session.started");
        let d = &start["data"];
        assert_eq!(
            (&d["session_id"], &d["user_id"]),
            (&json!("s-1"), &json!("u-1"))
        );
        assert_eq!(d["team_id"], "platform");
        assert_eq!(d["context"]["start_type"], "resume");
        envelopes(&out);
    }

    #[test]
    fn sizes_are_bounded_before_and_after_conversion() {
        // A long prompt is cut, not lost; a record with too much of everything is refused
        // alone; the others go on.
        let long = "p".repeat(100_000);
        let many: Vec<Value> = (0..40)
            .map(|i| json!({"key": format!("a{i}"), "value": {"stringValue": "v".repeat(8_000)}}))
            .collect();
        let doc = json!({"resourceLogs": [{"scopeLogs": [{"logRecords": [
            {"timeUnixNano": "1764115200000000000", "body": {"stringValue": "claude_code.user_prompt"},
             "attributes": [{"key": "prompt", "value": {"stringValue": long}}]},
            {"timeUnixNano": "1764115200000000000", "attributes": many}]}]}]});
        let out = log_events(&json::logs_request(&doc).unwrap(), Utc::now()).unwrap();
        let ev = json_events(&out);
        assert_eq!(out.events.len(), 1);
        assert_eq!(
            out.origins
                .iter()
                .map(Origin::to_string)
                .collect::<Vec<_>>(),
            ["resourceLogs[0].scopeLogs[0].logRecords[0]"]
        );
        let prompt = ev[0]["data"]["extra"]["prompt"].as_str().unwrap();
        assert_eq!(prompt.len(), MAX_TEXT + '…'.len_utf8());
        assert_eq!(out.rejected.len(), 1);
        assert!(
            out.rejected[0].reason.contains("at most"),
            "{:?}",
            out.rejected
        );
        envelopes(&out);

        // A 1 MiB resource attribute on 50 000 points would be 50 GiB of events: refused
        // before anything is built.
        let points: Vec<Value> = (0..MAX_POINTS)
            .map(|_| json!({"timeUnixNano": "1", "asInt": "1"}))
            .collect();
        let doc = json!({"resourceMetrics": [{
            "resource": {"attributes": [{"key": "k", "value": {"stringValue": "r".repeat(1 << 20)}}]},
            "scopeMetrics": [{"metrics": [{"name": "x", "gauge": {"dataPoints": points}}]}]}]});
        let err = metric_events(&json::metrics_request(&doc).unwrap()).unwrap_err();
        assert!(err.reason.contains("MiB of events"), "{}", err.reason);
    }

    #[test]
    fn every_point_of_a_nameless_metric_counts_as_refused() {
        let doc = json!({"resourceMetrics": [{"scopeMetrics": [{"scope": {"name": "s"}, "metrics": [
            {"gauge": {"dataPoints": [{"timeUnixNano": "1", "asInt": 1}, {"timeUnixNano": "2", "asInt": 1}]}},
            {"name": "ok", "gauge": {"dataPoints": [{"timeUnixNano": "1764115200000000000", "asInt": 1}]}}]}]}]});
        let out = metric_events(&json::metrics_request(&doc).unwrap()).unwrap();
        let ev = json_events(&out);
        assert_eq!(out.rejected.len(), 2);
        assert_eq!(
            ev[0]["data"]["extra"]["scope"], "s",
            "the scope tells points apart"
        );
        // bytesValue in any base64 proto3 JSON allows.
        for b64 in ["3q2+7w==", "3q2+7w", "3q2-7w=="] {
            let v = json::logs_request(&json!({"resourceLogs": [{"scopeLogs": [{"logRecords": [
                {"body": {"bytesValue": b64}}]}]}]}))
            .unwrap();
            let body = v.resource_logs[0].scope_logs[0].log_records[0].body.clone();
            assert_eq!(
                body.unwrap().value,
                Some(Any::BytesValue(vec![0xde, 0xad, 0xbe, 0xef])),
                "{b64}"
            );
        }
    }

    #[test]
    fn bad_points_are_refused_one_by_one() {
        let req = decode::<Metrics>(SNAKE_JSON.as_bytes(), Encoding::Json).unwrap();
        let out = metric_events(&req).unwrap();
        let ev = json_events(&out);
        assert_eq!(out.events.len(), 2);
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(
            out.rejected[0].field,
            "resourceMetrics[0].scopeMetrics[0].metrics[0].dataPoints[1]"
        );
        assert!(out.summary().starts_with("1 rejected; resourceMetrics[0]"));
        assert_eq!(ev[0]["data"]["extra"]["temporality"], "cumulative");
        assert_eq!(ev[1]["data"]["labels"]["tags"], r#"["a",2]"#);
        envelopes(&out);

        let no_time = json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
            {"name": "x", "gauge": {"dataPoints": [{"asDouble": 1}]}},
            {"name": "y"},
            {"name": "", "gauge": {"dataPoints": []}},
            {"name": "gap", "gauge": {"dataPoints": [{"timeUnixNano": "1", "flags": 1}]}}]}]}]});
        let req = json::metrics_request(&no_time).unwrap();
        let out = metric_events(&req).unwrap();
        assert!(
            out.events.is_empty(),
            "a point flagged NO_RECORDED_VALUE is a gap"
        );
        let reasons: Vec<_> = out.rejected.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].contains("timeUnixNano"));
        assert!(reasons[1].starts_with("no data"));
    }

    #[test]
    fn json_errors_name_the_field() {
        let cases = [
            (
                json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
                    {"name": "x", "gauge": {"dataPoints": [{"timeUnixNano": "soon"}]}}]}]}]}),
                "$.resourceMetrics[0].scopeMetrics[0].metrics[0].gauge.dataPoints[0].timeUnixNano",
            ),
            (
                json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
                    {"name": "x", "gauge": {"dataPoints": []}, "sum": {"dataPoints": []}}]}]}]}),
                "both `gauge` and `sum`",
            ),
            (
                json!({"resourceMetrics": {}}),
                "$.resourceMetrics: expected an array",
            ),
            (
                json!({"resourceMetrics": [{"resource": {"attributes": [
                    {"key": "k", "value": {"intValue": "12x"}}]}}]}),
                "$.resourceMetrics[0].resource.attributes[0].value.intValue",
            ),
            (
                json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "x",
                    "sum": {"aggregationTemporality": "SOMETIMES"}}]}]}]}),
                "unknown value `SOMETIMES`",
            ),
            (json!([1, 2]), "$: expected an object"),
        ];
        for (doc, want) in cases {
            let err = json::metrics_request(&doc).unwrap_err();
            assert!(err.contains(want), "{err} should contain {want}");
        }
        let err = decode::<Metrics>(b"{not json", Encoding::Json).unwrap_err();
        assert!(err.to_string().starts_with("invalid JSON"));
        let err = decode::<Metrics>(&[0xff, 0xff, 0xff], Encoding::Protobuf).unwrap_err();
        assert!(err.to_string().starts_with("invalid protobuf"));
        // Unknown fields are ignored, as OTLP/JSON asks.
        assert!(json::metrics_request(&json!({"resourceMetrics": [], "future": 1})).is_ok());
    }

    #[test]
    fn too_many_points_refuse_the_request() {
        let points: Vec<Value> = (0..=MAX_POINTS)
            .map(|i| json!({"timeUnixNano": "1764115200000000000", "asInt": i}))
            .collect();
        let doc = json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [
            {"name": "x", "gauge": {"dataPoints": points}}]}]}]});
        let req = json::metrics_request(&doc).unwrap();
        assert!(metric_events(&req).unwrap_err().reason.contains("at most"));
    }

    #[test]
    fn claude_code_events_become_typed_events() {
        let req = decode::<Logs>(LOGS_PB, Encoding::Protobuf).unwrap();
        let now = Utc::now();
        let out = log_events(&req, now).unwrap();
        let ev = json_events(&out);
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        let [tool, api, error, prompt, other] = &ev[..] else {
            panic!("five events: {:?}", ev)
        };
        assert_eq!(tool["type"], "tool.executed");
        assert_eq!(tool["occurred_at"], "2025-11-26T00:00:00+00:00");
        let t = &tool["data"];
        assert_eq!(
            (&t["tool_name"], &t["success"], &t["duration_ms"]),
            (&json!("Edit"), &json!(true), &json!(153))
        );
        assert_eq!(
            (&t["session_id"], &t["user_id"]),
            (&json!("s-77"), &json!("u-1f3a"))
        );
        assert_eq!(t["team_id"], "platform", "from the resource");
        assert_eq!(t["details"]["tool_use_id"], "toolu_01");
        assert_eq!(t["details"]["tool_result_size_bytes"], 2048);

        assert_eq!(api["type"], "agent.interacted");
        let a = &api["data"];
        assert_eq!(a["interaction_type"], "api_request");
        assert_eq!(a["agent_name"], "claude-code");
        assert_eq!(a["model"], "claude-sonnet-4-5");
        assert_eq!(a["cost_usd"], 0.0421);
        assert_eq!(
            [
                &a["input_tokens"],
                &a["output_tokens"],
                &a["cache_read_tokens"],
                &a["cache_creation_tokens"]
            ],
            [&json!(1520), &json!(310), &json!(9000), &json!(120)]
        );
        assert_eq!(a["duration_ms"], 2310);
        assert_eq!(a["status"], "success");
        assert_eq!(a["metadata"]["request_id"], "req_1");

        let e = &error["data"];
        assert_eq!(
            (&e["status"], &e["interaction_type"]),
            (&json!("error"), &json!("api_error"))
        );
        assert_eq!(e["error_message"], "overloaded_error");
        assert_eq!(e["metadata"]["status_code"], "529");

        assert_eq!(prompt["type"], "metric.sample");
        let p = &prompt["data"];
        assert_eq!(p["name"], "claude_code.user_prompt");
        assert_eq!((&p["value"], &p["kind"]), (&json!(1.0), &json!("counter")));
        assert_eq!(p["labels"]["prompt_length"], "57");
        assert_eq!(p["labels"]["session.id"], "s-77");

        // Not Claude Code, no name, no time but the observed one: still kept.
        let o = &other["data"];
        assert_eq!(o["name"], "log.record");
        assert_eq!(other["occurred_at"], "2025-11-26T00:00:04+00:00");
        assert_eq!(o["extra"]["body"]["msg"], "disk almost full");
        assert_eq!(o["extra"]["severity"], "WARN");
        assert_eq!(o["labels"]["raw"], "3q2+7w==");
        assert_eq!(o["labels"]["list"], r#"[1,"two"]"#);
        envelopes(&out);
    }

    #[test]
    fn log_json_reads_hex_ids_severity_names_and_lenient_values() {
        let doc = json!({"resource_logs": [{"scope_logs": [{"log_records": [{
            "trace_id": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
            "severityNumber": "SEVERITY_NUMBER_WARN3", "eventName": "claude_code.tool_result",
            "attributes": [{"key": "success", "value": {"stringValue": "false"}},
                           {"key": "error", "value": {"stringValue": "exit 1"}}]}]}]}]});
        let req = json::logs_request(&doc).unwrap();
        let r = &req.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(r.trace_id.len(), 16);
        assert_eq!(r.span_id, hex::decode("eee19b7ec3c1b174").unwrap());
        assert_eq!(r.severity_number, 15);
        let now = Utc::now();
        let out = log_events(&req, now).unwrap();
        let ev = json_events(&out);
        let d = &ev[0]["data"];
        assert_eq!(ev[0]["type"], "tool.executed");
        assert_eq!(
            (&d["success"], &d["error_message"]),
            (&json!(false), &json!("exit 1"))
        );
        assert_eq!(d["user_id"], "unknown");
        assert_eq!(ev[0]["occurred_at"], now.to_rfc3339());
        assert!(
            json::logs_request(&json!({"resourceLogs": [{"scopeLogs": [{"logRecords": [
            {"traceId": "not hex"}]}]}]}))
            .unwrap_err()
            .contains("traceId")
        );
    }

    #[test]
    fn partial_success_answers_in_the_request_encoding() {
        let mut out = Converted::default();
        assert_eq!(encode_response::<Metrics>(&out, Encoding::Json), b"{}");
        assert!(encode_response::<Metrics>(&out, Encoding::Protobuf).is_empty());
        out.rejected.push(FieldError::new("p", "bad"));
        let v: Value =
            serde_json::from_slice(&encode_response::<Logs>(&out, Encoding::Json)).unwrap();
        assert_eq!(v["partialSuccess"]["rejectedLogRecords"], "1");
        let r = pb::ExportMetricsServiceResponse::decode(
            encode_response::<Metrics>(&out, Encoding::Protobuf).as_slice(),
        )
        .unwrap();
        assert_eq!(r.partial_success.unwrap().rejected_data_points, 1);
    }
}
