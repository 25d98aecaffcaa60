//! The ingest doors driven through the service's router (`Router::oneshot`) with fake keys and
//! a recording sink: no PostgreSQL, Kafka or Redis is needed.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::response::Response;
use futures::future::BoxFuture;
use prost::Message;
use serde_json::{json, Value};
use shared::apikey::Scope;
use shared::auth::{KeyError, KeyPrincipal};
use shared::events::{EventType, Source};
use shared::tenant::TenantId;
use tower::ServiceExt;
use uuid::Uuid;

use crate::formats::promrw::{Label, Sample, TimeSeries, WriteRequest};
use crate::ingest::door::Keys;
use crate::ingest::sink::RecordingSink;
use crate::state::AppState;
use crate::{App, Config};

const KEY: &str = "tally_ingest_test";
const READ_KEY: &str = "tally_read_test";

/// Knows two keys of one tenant: [`KEY`] (scope `ingest`, `limit` requests a minute) and
/// [`READ_KEY`] (scope `read`).
struct FakeKeys {
    tenant: TenantId,
    limit: u32,
}

impl Keys for FakeKeys {
    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
        scope: Scope,
        _peer: Option<std::net::IpAddr>,
    ) -> BoxFuture<'a, Result<KeyPrincipal, KeyError>> {
        Box::pin(async move {
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' ').map(|(_, key)| key));
            let key_scope = match presented {
                Some(KEY) => Scope::Ingest,
                Some(READ_KEY) => Scope::Read,
                _ => return Err(KeyError::Unauthenticated("unknown or revoked API key")),
            };
            if key_scope != scope {
                return Err(KeyError::WrongScope {
                    has: key_scope,
                    needs: scope,
                });
            }
            Ok(KeyPrincipal {
                key_id: Uuid::nil(),
                tenant_id: self.tenant,
                scope: key_scope,
                rate_limit_per_min: self.limit,
                events_per_min: shared::auth::events_limit(self.limit),
                raw_retention_days: 3650,
                store_prompt_text: false,
                store_command_text: false,
                privacy: Default::default(),
            })
        })
    }
}

struct Harness {
    state: AppState,
    sink: RecordingSink,
    tenant: TenantId,
}

/// A state whose database pool never connects and whose producer never sends.
fn harness(limit: u32) -> Harness {
    let config = Config {
        // The OTLP fixtures carry the times they were recorded at.
        retention_days: 3650,
        ..Config::default()
    };
    let common = &config.common;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy(&common.database_url)
        .expect("a valid URL");
    let producer = shared::kafka::producer(common, Duration::from_secs(1)).expect("a producer");
    let sink = RecordingSink::default();
    let tenant = TenantId::new();
    let state = AppState {
        sink: Arc::new(sink.clone()),
        keys: Arc::new(FakeKeys { tenant, limit }),
        limiter: shared::ratelimit::RateLimiter::new(None),
        event_limiter: shared::ratelimit::RateLimiter::events(None),
        keyring: crate::keys::KeyRing::empty(),
        outbox_wake: Arc::default(),
        oidc: crate::oidc::Providers::new(Default::default()),
        throttle: crate::throttle::LoginThrottle::new(None, "", 5, 20, Duration::from_secs(60)),
        sso_starts: crate::throttle::LoginThrottle::new(
            None,
            "sso-start:",
            u32::MAX,
            60,
            Duration::from_secs(60),
        ),
        shed: crate::shed::Shed::new(crate::shed::Limits {
            requests: 64,
            bytes: 64 << 20,
            tenant_requests: 32,
            tenant_bytes: 32 << 20,
            max_body: config.max_body_bytes,
        }),
        webhooks: crate::routes::webhooks::budget(),
        lane: crate::ingest::lane::Lane::start(
            config.lane_threads,
            config.lane_min_bytes,
            config.lane_tenant_bodies,
        ),
        hashes: crate::throttle::HashSlots::new(1, Duration::from_millis(10)),
        pool,
        producer,
        redis: None,
        shutdown: Default::default(),
        metrics: shared::telemetry::prometheus(),
        config: Arc::new(config),
    };
    Harness {
        state,
        sink,
        tenant,
    }
}

impl Harness {
    async fn post(&self, uri: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Response {
        let mut req = Request::post(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        App::router(self.state.clone())
            .oneshot(req.body(body.into()).unwrap())
            .await
            .expect("the router answers")
    }
}

impl Harness {
    /// `POST /v1/events` of `body` as JSON, with `authorization` when given.
    async fn events(&self, authorization: Option<&str>, body: &Value) -> Response {
        let ct = ("content-type", "application/json");
        match authorization {
            Some(a) => {
                self.post("/v1/events", &[("authorization", a), ct], body.to_string())
                    .await
            }
            None => self.post("/v1/events", &[ct], body.to_string()).await,
        }
    }
}

fn sample() -> Value {
    json!({"type": "metric.sample", "occurred_at": now(), "data": {"name": "m", "value": 1}})
}

async fn json_body(res: Response) -> Value {
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

const BEARER: &str = "Bearer tally_ingest_test";

fn now() -> String {
    chrono::Utc::now().to_rfc3339()
}

#[tokio::test]
async fn post_events_appends_a_valid_batch_and_answers_202() {
    let h = harness(1000);
    let batch = json!([
        {"type": "command.executed", "occurred_at": now(),
         "data": {"user_id": "u1", "command_name": "build", "duration_ms": 12, "status": "success"}},
        sample(),
    ]);
    let res = h.events(Some(BEARER), &batch).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(res.headers()["x-ratelimit-limit"], "1000");
    let body = json_body(res).await;
    assert_eq!(body["accepted"], 2);
    let sent = h.sink.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        body["ids"],
        json!(sent.iter().map(|e| e.id.to_string()).collect::<Vec<_>>())
    );
    assert!(sent
        .iter()
        .all(|e| e.tenant_id == h.tenant && e.source == Source::Api));
    assert_eq!(sent[0].event_type, EventType::CommandExecuted);
    assert_eq!(sent[1].event_type, EventType::MetricSample);
}

#[tokio::test]
async fn post_events_refuses_a_batch_with_one_bad_event_whole() {
    let h = harness(1000);
    let batch = json!([
        sample(),
        {"type": "metric.sample", "occurred_at": now(), "data": {"value": "x"}},
    ]);
    let res = h.events(Some(BEARER), &batch).await;
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let problem = json_body(res).await;
    assert_eq!(problem["type"], "https://tally.dev/problems/validation");
    let mut fields: Vec<(&str, u64)> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["field"].as_str().unwrap(), e["index"].as_u64().unwrap()))
        .collect();
    fields.sort();
    assert_eq!(fields, [("data.name", 1), ("data.value", 1)]);
    assert!(
        h.sink.sent().is_empty(),
        "nothing of a refused batch is sent"
    );
}

#[tokio::test]
async fn the_door_checks_the_key_the_scope_and_the_rate_limit() {
    let h = harness(1);
    let event = sample();
    let res = h.events(None, &event).await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = h.events(Some("Bearer tally_read_test"), &event).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let res = h.events(Some(BEARER), &event).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let res = h.events(Some(BEARER), &event).await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["x-ratelimit-remaining"], "0");
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(h.sink.sent().len(), 1);
}

#[tokio::test]
async fn an_unavailable_log_is_a_503_with_retry_after() {
    let h = harness(1000);
    h.sink.fail(true);
    let event = sample();
    let res = h.events(Some(BEARER), &event).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(
        json_body(res).await["type"],
        "https://tally.dev/problems/unavailable"
    );
}

#[tokio::test]
async fn otlp_http_metrics_become_metric_samples() {
    let h = harness(1000);
    let body = include_str!("../../tests/fixtures/otlp/claude_code_metrics.json");
    let headers = [
        ("authorization", BEARER),
        ("content-type", "application/json"),
    ];
    let res = h.post("/v1/otlp/v1/metrics", &headers, body).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "application/json");
    // Everything taken: no partial success to report.
    assert_eq!(json_body(res).await, json!({}));
    let sent = h.sink.sent();
    assert!(!sent.is_empty());
    assert!(sent
        .iter()
        .all(|e| e.event_type == EventType::MetricSample && e.source == Source::Otlp));
    let names: std::collections::BTreeSet<&str> = sent
        .iter()
        .filter_map(|e| e.data["name"].as_str())
        .collect();
    assert!(names.contains("claude_code.token.usage"), "{names:?}");
    // The same request again gets the same ids: a resend is counted once.
    let again = h.post("/v1/otlp/v1/metrics", &headers, body).await;
    assert_eq!(again.status(), StatusCode::OK);
    let all = h.sink.sent();
    let (first, second) = all.split_at(sent.len());
    assert_eq!(
        first.iter().map(|e| e.id).collect::<Vec<_>>(),
        second.iter().map(|e| e.id).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn otlp_http_refuses_another_content_type() {
    let h = harness(1000);
    let res = h
        .post(
            "/v1/otlp/v1/metrics",
            &[("authorization", BEARER), ("content-type", "text/plain")],
            "x",
        )
        .await;
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(h.sink.sent().is_empty());
}

#[tokio::test]
async fn line_protocol_takes_the_good_lines_and_names_the_bad_ones() {
    let h = harness(1000);
    let ns = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let body =
        format!("cpu,host=a usage=1.5,idle=98 {ns}\nthis is not a line\nmem,host=a used=3i {ns}\n");
    let res = h
        .post(
            "/api/v2/write?precision=ns",
            &[("authorization", "Token tally_ingest_test")],
            body,
        )
        .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let problem = json_body(res).await;
    assert_eq!(problem["type"], "https://tally.dev/problems/partial-write");
    assert_eq!(problem["errors"][0]["field"], "line 2");
    let sent = h.sink.sent();
    let mut names: Vec<&str> = sent
        .iter()
        .filter_map(|e| e.data["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["cpu_idle", "cpu_usage", "mem_used"]);
    assert!(sent.iter().all(|e| e.source == Source::Influx));

    let good = format!("cpu,host=b usage=2 {ns}\n");
    let res = h
        .post(
            "/api/v2/write?precision=ns",
            &[("authorization", "Token tally_ingest_test")],
            good,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(h.sink.sent().len(), 4);
}

#[tokio::test]
async fn remote_write_appends_every_sample() {
    let h = harness(1000);
    let ms = chrono::Utc::now().timestamp_millis();
    let req = WriteRequest {
        timeseries: vec![TimeSeries {
            labels: vec![
                Label {
                    name: "__name__".into(),
                    value: "http_requests_total".into(),
                },
                Label {
                    name: "job".into(),
                    value: "api".into(),
                },
            ],
            samples: vec![
                Sample {
                    value: 1.0,
                    timestamp: ms - 1000,
                },
                Sample {
                    value: 2.0,
                    timestamp: ms,
                },
            ],
        }],
    };
    let body = snap::raw::Encoder::new()
        .compress_vec(&req.encode_to_vec())
        .unwrap();
    let headers = [
        ("authorization", BEARER),
        ("content-type", "application/x-protobuf"),
        ("content-encoding", "snappy"),
    ];
    let res = h.post("/api/v1/write", &headers, body.clone()).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let sent = h.sink.sent();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|e| e.source == Source::PromRw
        && e.data["name"] == "http_requests_total"
        && e.data["labels"]["job"] == "api"));
    assert_eq!(
        sent.iter()
            .map(|e| e.data["value"].as_f64().unwrap())
            .collect::<Vec<_>>(),
        [1.0, 2.0]
    );

    // Snappy is the only encoding remote write knows.
    let res = h
        .post(
            "/api/v1/write",
            &[
                ("authorization", BEARER),
                ("content-type", "application/x-protobuf"),
            ],
            body,
        )
        .await;
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(h.sink.sent().len(), 2);
}

/// A gzip body that inflates past the lane's size is charged for what it has inflated to
/// while it waits for the lane, and for all of it while it is worked on; the charge is given
/// back once it is done.
#[tokio::test]
async fn a_large_gzip_body_is_charged_while_it_waits_and_while_it_is_read() {
    use std::io::Write;
    let h = harness(1000);
    let s = &h.state;
    let text = vec![b'x'; 3 << 20];
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&text).unwrap();
    let sent = gz.finish().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, sent.len().into());
    headers.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
    let free = s.shed.bytes_free();
    let body = crate::ingest::door::read_body(s, h.tenant, Body::from(sent.clone()), &headers)
        .await
        .unwrap();
    // Inflated as far as the lane's size, and charged for that beyond its declared length.
    assert_eq!(free - s.shed.bytes_free(), s.lane.min_bytes() - sent.len());
    let (shed, whole) = (s.shed.clone(), text.len());
    let during = body
        .work(&s.lane, h.tenant, move |bytes| {
            assert_eq!(bytes.len(), whole);
            Ok(free - shed.bytes_free())
        })
        .await
        .unwrap();
    assert_eq!(during, whole - sent.len());
    assert_eq!(s.shed.bytes_free(), free);
}
