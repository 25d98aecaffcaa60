//! Write-side stamping: a client's event, plus what the door knows about the request (tenant,
//! actor, source, time, where ids come from), becomes an [`Envelope`] of the contract, or the
//! list of everything wrong with it.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use shared::events::{Actor, Envelope, EventType, FieldError, MetricSample, Payload, Source};
use shared::tenant::TenantId;
use uuid::Uuid;

use super::storable::{check_storable, has_nul, nul_paths};

/// How old a `session.context` may be: it moves its session's usage from its time on, so
/// its reach is bounded.
pub const MAX_CONTEXT_AGE: Duration = Duration::hours(1);

/// Bounds on a client's `occurred_at`.
#[derive(Debug, Clone, Copy)]
pub struct TimeBounds {
    /// How far in the future (client clock skew) an event may claim to be.
    pub max_future_skew: Duration,
    /// How old an event may be: the raw retention window.
    pub retention: Duration,
}

impl Default for TimeBounds {
    fn default() -> Self {
        TimeBounds {
            max_future_skew: Duration::minutes(5),
            retention: Duration::days(90),
        }
    }
}

/// What the write side knows about a request besides its body.
#[derive(Debug, Clone)]
pub struct IngestContext {
    pub tenant_id: TenantId,
    pub actor: Actor,
    pub source: Source,
    pub received_at: DateTime<Utc>,
    pub bounds: TimeBounds,
    /// Where the ids of events sent without one come from.
    pub ids: Ids,
}

/// Where an event's id comes from when its sender gave none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ids {
    /// A new UUIDv7: a retry of the event cannot be recognised.
    Fresh,
    /// Derived from the request's `Idempotency-Key` and the event's place in the batch.
    Idempotency(String),
    /// Derived from the event's content, for the foreign formats (OTLP, remote write, line
    /// protocol), whose senders resend a whole request after a failure and carry no ids: the
    /// same point sent again gets the same id. Two points equal in every field, time
    /// included, are the same point.
    Content,
}

/// A client event as a converter of a foreign format hands it to the door.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// As a client of the JSON door sends it: `{"type", "occurred_at", "data"}`.
    Json(Value),
    /// A `metric.sample`, built typed (an OTLP point, a log record counted as a sample).
    Sample(SampleEvent),
}

impl ClientEvent {
    /// The event as the JSON door would take it.
    pub fn into_json(self) -> Value {
        match self {
            ClientEvent::Json(v) => v,
            ClientEvent::Sample(s) => s.into_json(),
        }
    }
}

/// A `metric.sample` and its time, built typed by a converter: stamped without being
/// written as JSON and read back, which an OTLP point's labels were three times over.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleEvent {
    pub at: DateTime<Utc>,
    pub sample: MetricSample,
}

/// A sample event's content as [`SampleEvent::into_json`] writes it, its keys in the order
/// serde_json's maps keep them (sorted): the text its content id is hashed from.
#[derive(Serialize)]
struct SampleContent<'a> {
    data: SampleData<'a>,
    occurred_at: &'a str,
    #[serde(rename = "type")]
    event_type: &'static str,
}

#[derive(Serialize)]
struct SampleData<'a> {
    extra: &'a Map<String, Value>,
    kind: &'static str,
    labels: &'a std::collections::BTreeMap<String, String>,
    name: &'a str,
    value: f64,
}

impl SampleEvent {
    /// The event as a client would send it to the JSON door, `extra` always written (as
    /// converters wrote samples before they were typed): a refused sample is read this way,
    /// so that its refusal is the JSON door's, word for word.
    pub fn into_json(self) -> Value {
        let Value::Object(mut data) = self.sample.into_value() else {
            unreachable!("a sample's form is an object")
        };
        data.entry("extra")
            .or_insert_with(|| Value::Object(Map::new()));
        client_json(EventType::MetricSample.as_str(), &self.at, data)
    }

    /// Whether any text of the sample holds a NUL character.
    fn has_nul(&self) -> bool {
        let s = &self.sample;
        let nul = |t: &str| t.contains('\0');
        nul(&s.name)
            || s.labels.iter().any(|(k, v)| nul(k) || nul(v))
            || s.extra.iter().any(|(k, v)| nul(k) || has_nul(v))
    }

    /// `content_id` of the event as [`SampleEvent::into_json`] builds it, without building it.
    fn content_id(&self, tenant: TenantId) -> Uuid {
        let s = &self.sample;
        let content = SampleContent {
            data: SampleData {
                extra: &s.extra,
                kind: s.kind.as_str(),
                labels: &s.labels,
                name: &s.name,
                value: s.value,
            },
            occurred_at: &shared::rfc3339::to_rfc3339(&self.at),
            event_type: EventType::MetricSample.as_str(),
        };
        content_id(tenant, &content)
    }
}

/// A client event of type `event_type` as the JSON door takes it, built around `data` rather
/// than copied (`json!` would copy every value it is given).
pub fn client_json(event_type: &str, at: &DateTime<Utc>, data: Map<String, Value>) -> Value {
    let mut event = Map::new();
    event.insert("type".into(), Value::from(event_type));
    event.insert(
        "occurred_at".into(),
        Value::from(shared::rfc3339::to_rfc3339(at)),
    );
    event.insert("data".into(), Value::Object(data));
    Value::Object(event)
}

/// Namespace for ids derived from an `Idempotency-Key`.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_5b1e_2a7d_4c4e_9d1a_7a11_7a11_0001);
/// Namespace for ids derived from an event's content.
const CONTENT_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_5b1e_2a7d_4c4e_9d1a_7a11_7a11_0002);

impl IngestContext {
    /// Turns one client event (`{"id"?, "type", "occurred_at", "schema_version"?, "data"}`) into
    /// an envelope, or says everything that is wrong with it. `index` is its place in the batch.
    pub fn envelope(&self, index: usize, raw: Value) -> Result<Envelope, Vec<FieldError>> {
        self.parse_envelope(index, raw).map_err(|mut errors| {
            for e in &mut errors {
                e.index = Some(index);
            }
            errors
        })
    }

    /// [`IngestContext::envelope`] of a converter's event. A sample built typed is stamped
    /// as it is when every check passes; otherwise it is read as the JSON door reads it, so
    /// that a refusal names the same fields for the same reasons.
    pub fn client_envelope(
        &self,
        index: usize,
        event: ClientEvent,
    ) -> Result<Envelope, Vec<FieldError>> {
        let s = match event {
            ClientEvent::Json(raw) => return self.envelope(index, raw),
            ClientEvent::Sample(s) => s,
        };
        // The JSON door's checks of such an event: its time within bounds, no NUL, the
        // payload's limits and what the database can store. (Its shape is the payload's.)
        // (A leap second, which only a log record's `event.timestamp` could name, is read
        // back as the JSON door would read it.)
        let in_time = s.at <= self.received_at + self.bounds.max_future_skew
            && s.at >= self.received_at - self.bounds.retention
            && s.at.timestamp_subsec_nanos() < 1_000_000_000;
        let nul = s.has_nul();
        let at = s.at;
        let payload = Payload::MetricSample(s.sample);
        let passes = in_time
            && !nul
            && payload.check_limits("data").is_empty()
            && check_storable(&payload, "data").is_empty();
        let Payload::MetricSample(sample) = payload else {
            unreachable!("built as a sample above")
        };
        let s = SampleEvent { at, sample };
        if !passes {
            return self.envelope(index, s.into_json());
        }
        let id = self.default_id(index, || s.content_id(self.tenant_id));
        Ok(Envelope {
            id,
            tenant_id: self.tenant_id,
            event_type: EventType::MetricSample,
            schema_version: EventType::MetricSample.current_version(),
            occurred_at: s.at,
            received_at: self.received_at,
            actor: self.actor.clone(),
            source: self.source,
            data: s.sample.into_value(),
        })
    }

    fn parse_envelope(&self, index: usize, raw: Value) -> Result<Envelope, Vec<FieldError>> {
        let Value::Object(mut obj) = raw else {
            return Err(vec![FieldError::new("", "an event must be a JSON object")]);
        };
        let mut errors = Vec::new();
        let id = match obj.remove("id") {
            None | Some(Value::Null) => {
                Some(self.default_id(index, || content_id(self.tenant_id, &obj)))
            }
            Some(Value::String(s)) => match Uuid::parse_str(&s) {
                Ok(id) if !id.is_nil() => Some(id),
                _ => {
                    errors.push(FieldError::new("id", "must be a non-nil UUID"));
                    None
                }
            },
            Some(_) => {
                errors.push(FieldError::new("id", "must be a UUID string"));
                None
            }
        };
        let event_type = match obj.remove("type") {
            Some(Value::String(s)) => match EventType::parse(&s).filter(|t| t.from_clients()) {
                Some(t) => Some(t),
                None => {
                    errors.push(FieldError::new(
                        "type",
                        format!(
                            "unknown event type `{}`; known: {}",
                            truncate(&s, 64),
                            EventType::ALL.map(EventType::as_str).join(", ")
                        ),
                    ));
                    None
                }
            },
            None => {
                errors.push(FieldError::new("type", "is required"));
                None
            }
            Some(_) => {
                errors.push(FieldError::new("type", "must be a string"));
                None
            }
        };
        let occurred_at = match obj.remove("occurred_at") {
            Some(Value::String(s)) => match DateTime::parse_from_rfc3339(&s) {
                Ok(t) => {
                    let t = t.with_timezone(&Utc);
                    if t > self.received_at + self.bounds.max_future_skew {
                        errors.push(FieldError::new(
                            "occurred_at",
                            format!(
                                "is more than {} s in the future",
                                self.bounds.max_future_skew.num_seconds()
                            ),
                        ));
                    } else if t < self.received_at - self.bounds.retention {
                        errors.push(FieldError::new(
                            "occurred_at",
                            format!(
                                "is older than the retention window of {} days",
                                self.bounds.retention.num_days()
                            ),
                        ));
                    }
                    Some(t)
                }
                Err(e) => {
                    errors.push(FieldError::new(
                        "occurred_at",
                        format!("must be an RFC 3339 timestamp: {e}"),
                    ));
                    None
                }
            },
            None => {
                errors.push(FieldError::new("occurred_at", "is required"));
                None
            }
            Some(_) => {
                errors.push(FieldError::new(
                    "occurred_at",
                    "must be an RFC 3339 timestamp string",
                ));
                None
            }
        };
        let schema_version = match obj.remove("schema_version") {
            None | Some(Value::Null) => event_type.map(EventType::current_version),
            Some(Value::Number(n)) => match n.as_u64().and_then(|v| u32::try_from(v).ok()) {
                Some(v) => Some(v),
                None => {
                    errors.push(FieldError::new(
                        "schema_version",
                        "must be a positive integer",
                    ));
                    None
                }
            },
            Some(_) => {
                errors.push(FieldError::new(
                    "schema_version",
                    "must be a positive integer",
                ));
                None
            }
        };
        // A context re-attributes its session's usage from its time on: it must be recent.
        if let (Some(EventType::SessionContext), Some(t)) = (event_type, occurred_at) {
            if t < self.received_at - MAX_CONTEXT_AGE {
                errors.push(FieldError::new(
                    "occurred_at",
                    format!(
                        "a session.context may be at most {} minutes old",
                        MAX_CONTEXT_AGE.num_minutes()
                    ),
                ));
            }
        }
        let data = obj.remove("data");
        if let Some(k) = obj.keys().next() {
            errors.push(FieldError::new(
                k.clone(),
                "unknown envelope field; payload fields belong in `data`",
            ));
        }
        let payload = match (event_type, schema_version, data) {
            (_, _, None) => {
                errors.push(FieldError::new("data", "is required"));
                None
            }
            (Some(t), Some(v), Some(data)) => {
                let nul = nul_paths(&data, "data");
                match Payload::decode_normalized(t, v, data, "data") {
                    Ok((p, data)) if nul.is_empty() => {
                        errors.extend(check_storable(&p, "data"));
                        Some((p, data))
                    }
                    Ok(_) => {
                        errors.extend(nul);
                        None
                    }
                    Err(e) => {
                        errors.extend(nul);
                        errors.extend(e);
                        None
                    }
                }
            }
            _ => None,
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let (Some(id), Some(occurred_at), Some((payload, data))) = (id, occurred_at, payload)
        else {
            unreachable!("no errors means every part was parsed");
        };
        Ok(Envelope {
            id,
            tenant_id: self.tenant_id,
            event_type: payload.event_type(),
            schema_version: payload.event_type().current_version(),
            occurred_at,
            received_at: self.received_at,
            actor: self.actor.clone(),
            source: self.source,
            data,
        })
    }

    /// The id of an event sent without one; `content_id` is its [`Ids::Content`] id.
    fn default_id(&self, index: usize, content_id: impl FnOnce() -> Uuid) -> Uuid {
        match &self.ids {
            Ids::Fresh => Uuid::now_v7(),
            Ids::Idempotency(key) => Uuid::new_v5(
                &IDEMPOTENCY_NAMESPACE,
                format!("{}/{}/{}", self.tenant_id, key, index).as_bytes(),
            ),
            Ids::Content => content_id(),
        }
    }
}

/// `Uuid::new_v5(&CONTENT_NAMESPACE, "<tenant>/<content as JSON>")`, the name written
/// once, into one buffer. (Not streamed into the hash: SHA-1 fed serde_json's many small
/// writes cost more than the copy.) The hash is the `sha1` crate's, which uses the CPU's
/// SHA instructions where it has them: `uuid`'s own SHA-1 is portable code, and was about a
/// tenth of an OTLP point's door work.
fn content_id(tenant: TenantId, content: &impl Serialize) -> Uuid {
    use sha1::{Digest, Sha1};
    let mut name = Vec::with_capacity(CONTENT_NAME_GUESS);
    // As `TenantId`'s `Display` writes it, without `core::fmt`.
    let tenant = tenant.0.hyphenated();
    name.extend_from_slice(tenant.encode_lower(&mut Uuid::encode_buffer()).as_bytes());
    name.push(b'/');
    serde_json::to_writer(&mut name, content).expect("an event's content serializes");
    let mut hash = Sha1::new();
    hash.update(CONTENT_NAMESPACE.as_bytes());
    hash.update(&name);
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// Room for an OTLP point's content as JSON at first; a longer one only reallocates.
const CONTENT_NAME_GUESS: usize = 640;

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> IngestContext {
        IngestContext {
            tenant_id: TenantId::new(),
            actor: Actor::default(),
            source: Source::Api,
            received_at: Utc::now(),
            bounds: TimeBounds::default(),
            ids: Ids::Fresh,
        }
    }

    #[test]
    fn content_ids_are_the_v5_uuids_of_tenant_and_content() {
        let tenant = TenantId::new();
        let content = json!({"type": "metric.sample", "occurred_at": "2026-12-01T12:00:00+00:00",
                             "data": {"name": "n\u{e9}\"", "labels": {"b": "2", "a": "1"}, "value": 1.5}});
        let content = content.as_object().unwrap();
        let text = serde_json::to_string(content).unwrap();
        assert_eq!(
            content_id(tenant, content),
            Uuid::new_v5(&CONTENT_NAMESPACE, format!("{tenant}/{text}").as_bytes())
        );
        // Names of every length around SHA-1's 64-byte blocks and its padding.
        for n in 0..200 {
            let content = json!({"type": "metric.sample", "data": {"name": "x".repeat(n)}});
            let content = content.as_object().unwrap();
            let text = serde_json::to_string(content).unwrap();
            assert_eq!(
                content_id(tenant, content),
                Uuid::new_v5(&CONTENT_NAMESPACE, format!("{tenant}/{text}").as_bytes()),
                "a name of {n} bytes"
            );
        }
    }

    /// A content id is the hash of the content's JSON text, so the text must not depend on
    /// the order a sender or a converter wrote the keys in: serde_json's maps keep theirs
    /// sorted (its `preserve_order` feature, which would keep insertion order, is off).
    #[test]
    fn content_ids_do_not_depend_on_the_order_keys_were_written() {
        let tenant = TenantId::new();
        let mut forward = Map::new();
        let mut backward = Map::new();
        for k in ["type", "occurred_at", "data"] {
            forward.insert(k.to_string(), Value::from(k));
        }
        for k in ["data", "occurred_at", "type"] {
            backward.insert(k.to_string(), Value::from(k));
        }
        assert_eq!(
            serde_json::to_string(&backward).unwrap(),
            r#"{"data":"data","occurred_at":"occurred_at","type":"type"}"#
        );
        assert_eq!(content_id(tenant, &forward), content_id(tenant, &backward));
    }

    fn now() -> String {
        Utc::now().to_rfc3339()
    }

    /// Samples near every check the JSON door makes, and texts JSON must escape.
    fn samples(now: DateTime<Utc>) -> Vec<SampleEvent> {
        let base = SampleEvent {
            at: now - Duration::minutes(3),
            sample: MetricSample {
                name: "claude_code.token.usage".into(),
                labels: [("user.id", "u1"), ("type", "input"), ("model", "opus")]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
                value: 42.5,
                kind: shared::events::SampleKind::Counter,
                extra: json!({"temporality": "delta", "monotonic": true})
                    .as_object()
                    .cloned()
                    .unwrap(),
            },
        };
        let with = |f: &dyn Fn(&mut SampleEvent)| {
            let mut s = base.clone();
            f(&mut s);
            s
        };
        let label = |k: &str, v: String| {
            with(&|s| {
                s.sample.labels.insert(k.to_string(), v.clone());
            })
        };
        // Yesterday's last second, had it been a leap second.
        let leap = (now - Duration::days(1))
            .date_naive()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        vec![
            base.clone(),
            with(&|s| s.sample.extra.clear()),
            with(&|s| s.sample.labels.clear()),
            with(&|s| s.sample.kind = shared::events::SampleKind::Gauge),
            with(&|s| s.sample.value = -0.0),
            with(&|s| s.sample.value = 1e300),
            with(&|s| s.at = now + Duration::minutes(4)),
            with(&|s| s.at = now + Duration::minutes(6)),
            with(&|s| s.at = now - Duration::days(89)),
            with(&|s| s.at = now - Duration::days(91)),
            with(&|s| s.at = leap),
            with(&|s| s.at += Duration::nanoseconds(123_456_789)),
            label(
                "path",
                "C:\\x \"quoted\" \u{1}\u{7f} \u{e9}\u{1f600} </".into(),
            ),
            label("user.id", "x".repeat(600)),
            label("user.id", "x".repeat(601)),
            label("other", "y".repeat(1024)),
            label("other", "y".repeat(1025)),
            label("nul", "a\u{0}b".into()),
            label("k\u{0}", "v".into()),
            label("", "empty name".into()),
            with(&|s| s.sample.name = "n\u{0}".into()),
            with(&|s| s.sample.name = String::new()),
            with(&|s| s.sample.name = "\u{4e00}".repeat(256)),
            with(&|s| {
                s.sample
                    .extra
                    .insert("deep".into(), json!({"a": ["b", {"c\u{0}": 1}]}));
            }),
            with(&|s| {
                for i in 0..=shared::events::MAX_LABELS {
                    s.sample.labels.insert(format!("l{i}"), i.to_string());
                }
            }),
        ]
    }

    /// A sample built typed is stamped as the JSON door stamps it as a client would send it:
    /// the same id, the same envelope, or the same refusal.
    #[test]
    fn typed_samples_are_stamped_as_the_json_door_stamps_them() {
        for ids in [Ids::Content, Ids::Idempotency("retry-1".into())] {
            let ctx = IngestContext {
                source: Source::Otlp,
                ids: ids.clone(),
                ..ctx()
            };
            let mut refused = 0;
            for (i, sample) in samples(ctx.received_at).into_iter().enumerate() {
                let typed = ctx.client_envelope(i, ClientEvent::Sample(sample.clone()));
                let json = ctx.envelope(i, sample.clone().into_json());
                assert_eq!(typed, json, "case {i}: {sample:?}");
                refused += usize::from(typed.is_err());
            }
            assert_eq!(refused, 12, "the cases past a limit");
        }
    }

    #[test]
    fn contexts_are_recent_and_name_a_repository() {
        let context = |age_min: i64, repository: &str| {
            json!({"type": "session.context",
                   "occurred_at": (Utc::now() - Duration::minutes(age_min)).to_rfc3339(),
                   "data": {"session_id": "s", "user_id": "u", "repository": repository,
                            "branch": "main"}})
        };
        let env = ctx()
            .envelope(0, context(5, "git@github.com:Acme/Widgets.git"))
            .expect("a recent context");
        let Payload::SessionContext(p) = env.payload().unwrap() else {
            panic!("a context")
        };
        assert_eq!(p.repository.as_deref(), Some("github.com/acme/widgets"));
        let old = ctx()
            .envelope(0, context(61, "github.com/a/b"))
            .unwrap_err();
        assert_eq!(old[0].field, "occurred_at");
        let local = ctx().envelope(0, context(1, "/home/me/repo")).unwrap_err();
        assert_eq!(local[0].field, "data.repository");
        // Pull requests come from the webhook receivers only.
        let forged = ctx()
            .envelope(
                0,
                json!({"type": "pull_request.changed", "occurred_at": now(), "data": {}}),
            )
            .unwrap_err();
        assert_eq!(forged[0].field, "type");
    }

    #[test]
    fn what_postgresql_cannot_store_is_refused_at_the_door() {
        let fields = |e: Value| -> Vec<String> {
            let mut f: Vec<String> = ctx()
                .envelope(0, e)
                .expect_err("refused")
                .into_iter()
                .map(|f| f.field)
                .collect();
            f.sort();
            f
        };
        let nul = json!({"type": "command.executed", "occurred_at": now(), "data": {
            "user_id": "u", "command_name": "a\u{0}b", "duration_ms": 1, "status": "success",
            "args": {"list": ["ok", "x\u{0}"], "k\u{0}": 1}}});
        assert_eq!(
            fields(nul),
            [
                "data.args.k\\u0000",
                "data.args.list[1]",
                "data.command_name"
            ]
        );
        // 255 characters, but 765 bytes: over the rollup key's share of the index row.
        let wide = "\u{4e00}".repeat(255);
        let long = json!({"type": "command.executed", "occurred_at": now(), "data": {
            "user_id": wide, "team_id": "t", "command_name": "build", "duration_ms": 1,
            "status": "success"}});
        assert_eq!(fields(long), ["data.user_id"]);
        let label = json!({"type": "metric.sample", "occurred_at": now(), "data": {
            "name": "m", "value": 1,
            "labels": {"user.id": "x".repeat(601), "other": "y".repeat(1000)}}});
        assert_eq!(fields(label), ["data.labels.user.id"]);
        // Within the bounds, the same event passes.
        let fine = json!({"type": "command.executed", "occurred_at": now(), "data": {
            "user_id": "\u{4e00}".repeat(200), "command_name": "build", "duration_ms": 1,
            "status": "success"}});
        ctx().envelope(0, fine).expect("accepted");
    }

    #[test]
    fn valid_events_of_every_type_are_accepted() {
        let cases = [
            json!({"type": "command.executed", "occurred_at": now(), "data": {"user_id": "u1", "command_name": "build", "duration_ms": 12, "status": "success"}}),
            json!({"type": "agent.interacted", "occurred_at": now(), "data": {"user_id": "u1", "agent_name": "claude", "interaction_type": "chat", "input_tokens": 10, "output_tokens": 20, "duration_ms": 3, "status": "error", "error_message": "boom"}}),
            json!({"type": "tool.executed", "occurred_at": now(), "data": {"user_id": "u1", "session_id": "s1", "tool_name": "Edit", "duration_ms": 5, "success": true}}),
            json!({"type": "session.started", "occurred_at": now(), "data": {"user_id": "u1", "session_id": "s1"}}),
            json!({"type": "session.ended", "occurred_at": now(), "data": {"user_id": "u1", "session_id": "s1", "commands_executed": 3, "agents_used": ["a"], "productivity_score": 77.5}}),
            json!({"type": "productivity.recorded", "occurred_at": now(), "data": {"metric_type": "error_rate", "value": 0.1, "unit": "ratio"}}),
            json!({"type": "metric.sample", "occurred_at": now(), "schema_version": 1, "data": {"name": "claude_code.token.usage", "labels": {"type": "input"}, "value": 42.0, "kind": "counter"}}),
        ];
        for (i, c) in cases.into_iter().enumerate() {
            let env = ctx().envelope(i, c.clone());
            assert!(env.is_ok(), "case {i} {c}: {env:?}");
            let env = env.unwrap();
            assert_eq!(env.payload().unwrap().event_type(), env.event_type);
        }
    }

    #[test]
    fn invalid_events_name_every_offending_field() {
        let cases: Vec<(Value, Vec<&str>)> = vec![
            (json!([1]), vec![""]),
            (json!({"occurred_at": now(), "data": {}}), vec!["type"]),
            (
                json!({"type": "nope.nope", "occurred_at": now(), "data": {}}),
                vec!["type"],
            ),
            (
                json!({"type": "command.executed", "occurred_at": "yesterday", "data": {"user_id": "u", "command_name": "c", "duration_ms": 1, "status": "success"}}),
                vec!["occurred_at"],
            ),
            (
                json!({"type": "command.executed", "occurred_at": "2001-01-01T00:00:00Z", "data": {"user_id": "u", "command_name": "c", "duration_ms": 1, "status": "success"}}),
                vec!["occurred_at"],
            ),
            (
                json!({"type": "command.executed", "occurred_at": (Utc::now() + Duration::hours(1)).to_rfc3339(), "data": {"user_id": "u", "command_name": "c", "duration_ms": 1, "status": "success"}}),
                vec!["occurred_at"],
            ),
            (
                json!({"type": "command.executed", "occurred_at": now(), "data": {"user_id": "u", "command_name": "c", "duration_ms": "slow", "status": "success"}}),
                vec!["data.duration_ms"],
            ),
            (
                json!({"type": "command.executed", "occurred_at": now(), "data": {"command_name": "c", "duration_ms": 1, "status": "success"}}),
                vec!["data.user_id"],
            ),
            (
                json!({"type": "command.executed", "occurred_at": now(), "data": {"user_id": 5, "duration_ms": "x", "status": "success", "args": []}}),
                vec![
                    "data.args",
                    "data.duration_ms",
                    "data.user_id",
                    "data.command_name",
                ],
            ),
            (
                json!({"type": "command.executed", "occurred_at": now(), "data": {"user_id": "", "command_name": "x".repeat(256), "duration_ms": 3_600_001, "status": "success", "error_message": "e".repeat(10_001)}}),
                vec![
                    "data.user_id",
                    "data.command_name",
                    "data.duration_ms",
                    "data.error_message",
                ],
            ),
            (
                json!({"type": "command.executed", "occurred_at": now(), "data": {"user_id": "u", "command_name": "c", "duration_ms": 1, "status": "meh"}}),
                vec!["data.status"],
            ),
            (
                json!({"type": "agent.interacted", "occurred_at": now(), "data": {"user_id": "u", "agent_name": "a", "interaction_type": "", "input_tokens": -1, "output_tokens": 1_000_001, "duration_ms": 1, "status": "success"}}),
                vec![
                    "data.interaction_type",
                    "data.input_tokens",
                    "data.output_tokens",
                ],
            ),
            (
                json!({"type": "session.ended", "occurred_at": now(), "data": {"user_id": "u", "session_id": "s", "productivity_score": 101}}),
                vec!["data.productivity_score"],
            ),
            (
                json!({"type": "productivity.recorded", "occurred_at": now(), "data": {"metric_type": "happiness", "value": 1}}),
                vec!["data.metric_type"],
            ),
            (
                json!({"type": "metric.sample", "occurred_at": now(), "schema_version": 9, "data": {"name": "m", "value": 1}}),
                vec!["schema_version"],
            ),
            (
                json!({"id": "not-a-uuid", "type": "metric.sample", "occurred_at": now(), "data": {"name": "m", "value": 1}}),
                vec!["id"],
            ),
            (
                json!({"type": "metric.sample", "occurred_at": now(), "tenant_id": "x", "data": {"name": "m", "value": 1}}),
                vec!["tenant_id"],
            ),
            (
                json!({"type": "metric.sample", "occurred_at": now()}),
                vec!["data"],
            ),
            (
                json!({"type": "auth.login_succeeded", "occurred_at": now(), "data": {}}),
                vec!["type"],
            ),
        ];
        for (i, (event, fields)) in cases.into_iter().enumerate() {
            let errs = ctx()
                .envelope(7, event.clone())
                .expect_err(&format!("case {i} {event} should fail"));
            let got: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
            assert_eq!(got, fields, "case {i}: {errs:?}");
            assert!(errs
                .iter()
                .all(|e| e.index == Some(7) && !e.reason.is_empty()));
        }
    }

    #[test]
    fn unknown_payload_fields_are_kept_in_extra() {
        let env = ctx()
            .envelope(
                0,
                json!({"type": "tool.executed", "occurred_at": now(), "data": {"user_id": "u", "session_id": "s", "tool_name": "Bash", "duration_ms": 1, "success": false, "exit_code": 2, "extra": {"a": 1}}}),
            )
            .unwrap();
        assert_eq!(env.data["extra"], json!({"a": 1, "exit_code": 2}));
        assert!(env.data.get("exit_code").is_none());
        // And the stored form decodes to the same payload again.
        let Payload::ToolExecuted(p) = env.payload().unwrap() else {
            panic!("wrong type")
        };
        assert_eq!(p.extra.get("exit_code"), Some(&json!(2)));
    }

    #[test]
    fn idempotency_key_derives_stable_ids() {
        let mut c = ctx();
        c.ids = Ids::Idempotency("req-1".into());
        let e = json!({"type": "metric.sample", "occurred_at": now(), "data": {"name": "m", "value": 1}});
        let a = c.envelope(0, e.clone()).unwrap().id;
        let b = c.envelope(0, e.clone()).unwrap().id;
        let other = c.envelope(1, e).unwrap().id;
        assert_eq!(a, b);
        assert_ne!(a, other);
    }

    #[test]
    fn content_ids_follow_the_content_not_the_place() {
        let mut c = ctx();
        c.ids = Ids::Content;
        let e = json!({"type": "metric.sample", "occurred_at": now(), "data": {"name": "m", "value": 1}});
        let a = c.envelope(0, e.clone()).unwrap().id;
        assert_eq!(
            a,
            c.envelope(7, e.clone()).unwrap().id,
            "a resend, elsewhere in a batch"
        );
        let mut changed = e.clone();
        changed["data"]["value"] = json!(2);
        assert_ne!(a, c.envelope(0, changed).unwrap().id);
        let other_tenant = IngestContext {
            tenant_id: TenantId::new(),
            ..c.clone()
        };
        assert_ne!(a, other_tenant.envelope(0, e.clone()).unwrap().id);
        // An id the sender gave wins.
        let mut given = e;
        given["id"] = json!("0193a8f0-0000-7000-8000-000000000001");
        assert_eq!(
            c.envelope(0, given).unwrap().id.to_string(),
            "0193a8f0-0000-7000-8000-000000000001"
        );
        let fresh = ctx();
        let e = json!({"type": "metric.sample", "occurred_at": now(), "data": {"name": "m", "value": 1}});
        assert_ne!(
            fresh.envelope(0, e.clone()).unwrap().id,
            fresh.envelope(0, e).unwrap().id
        );
    }

    #[test]
    fn envelope_round_trips_through_json() {
        let env = ctx()
            .envelope(
                0,
                json!({"type": "command.executed", "occurred_at": now(), "data": {"user_id": "u1", "session_id": "s9", "command_name": "build", "duration_ms": 12, "status": "success"}}),
            )
            .unwrap();
        let bytes = serde_json::to_vec(&env).unwrap();
        let back: Envelope = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, env);
        assert_eq!(env.kafka_key(), format!("{}:s9", env.tenant_id));
    }
}
