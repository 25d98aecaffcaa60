//! Write-side stamping: a client's event, plus what the door knows about the request (tenant,
//! actor, source, time, where ids come from), becomes an [`Envelope`] of the contract, or the
//! list of everything wrong with it.

use std::borrow::Cow;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use shared::events::{
    nesting, Actor, Envelope, EventData, EventType, FieldError, MetricSample, Payload, Source,
};
use shared::tenant::TenantId;
use uuid::Uuid;

use super::privacy::{drop_prompt_text, drop_sample_prompt, drop_stamped_command_text};
use super::storable::{check_storable, has_unstorable, key_fault, unstorable_paths};

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

/// An envelope's `data` as a door holds it until it is written: the typed payload of an
/// event read or built typed, or the tree of one read as a tree. Both are written as the
/// same JSON, the payload's normalized form.
// Most events are held typed: boxing the payload would allocate for each of them.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Typed(Payload),
    Json(Value),
}

/// An envelope as the log holds it once written, read back as the projector reads it.
pub fn written(env: &Stamped) -> Envelope {
    let bytes = serde_json::to_vec(env).expect("an envelope serializes");
    serde_json::from_slice(&bytes).expect("a written envelope reads back")
}

impl Data {
    /// The data as the contract's JSON.
    pub fn into_value(self) -> Value {
        match self {
            Data::Typed(p) => p.to_value(),
            Data::Json(v) => v,
        }
    }
}

impl Serialize for Data {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Data::Typed(p) => p.serialize(s),
            Data::Json(v) => v.serialize(s),
        }
    }
}

impl EventData for Data {
    fn write_spread(&self, out: &mut String) {
        match self {
            Data::Typed(p) => p.write_spread(out),
            Data::Json(v) => v.write_spread(out),
        }
    }
}

/// An event as a door stamped it, for the log.
pub type Stamped = Envelope<Data>;

/// What a tenant keeps of the text its events carry (see [`super::privacy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    pub prompts: bool,
    pub commands: bool,
}

/// A client event's envelope fields as its JSON text has them, `data` left as text: read
/// without building a tree. Anything else in the event makes it a tree's to read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientText<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow)]
    occurred_at: Cow<'a, str>,
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(borrow)]
    data: &'a RawValue,
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

    /// Whether any text of the sample holds a NUL character, or any key is one the log's
    /// readers could not read back (see [`key_fault`]).
    fn has_unstorable(&self) -> bool {
        let s = &self.sample;
        let nul = |t: &str| t.contains('\0');
        let key = |k: &str| key_fault(k).is_some();
        nul(&s.name)
            || s.labels.iter().any(|(k, v)| key(k) || nul(v))
            || s.extra.iter().any(|(k, v)| key(k) || has_unstorable(v))
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

/// The events of a body that is an event object or an array of 1..=`max` of them, each as
/// its text; `None` for any other body.
pub fn event_texts(bytes: &[u8], max: usize) -> Option<Vec<&RawValue>> {
    let texts = match bytes.iter().find(|b| !b.is_ascii_whitespace())? {
        b'[' => serde_json::from_slice::<Vec<&RawValue>>(bytes).ok()?,
        b'{' => vec![serde_json::from_slice::<&RawValue>(bytes).ok()?],
        _ => return None,
    };
    (1..=max).contains(&texts.len()).then_some(texts)
}

/// A batch's envelopes put into `into` an envelope at a time as each is stamped (a door's
/// `crate::ingest::sink::Batching`, which serializes each and lets its tree go), or
/// everything wrong with its events: a batch is taken whole or not at all, and once an event
/// is refused the rest are only checked.
pub fn whole_batch<B: Extend<Stamped>>(
    stamped: impl Iterator<Item = Result<Stamped, Vec<FieldError>>>,
    mut into: B,
) -> Result<B, Vec<FieldError>> {
    let mut errors = Vec::new();
    for s in stamped {
        match s {
            Ok(env) if errors.is_empty() => into.extend(Some(env)),
            Ok(_) => {}
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(into)
    } else {
        Err(errors)
    }
}

/// How deep an event of a body split into texts may nest and still be read as a tree on its
/// own; a deeper one, whose body might nest past what serde_json reads, is left to the body's
/// tree.
const MAX_EVENT_NESTING: usize = 100;

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
    ) -> Result<Stamped, Vec<FieldError>> {
        let s = match event {
            ClientEvent::Json(raw) => {
                return self.envelope(index, raw).map(|e| e.map_data(Data::Json))
            }
            ClientEvent::Sample(s) => s,
        };
        // The JSON door's checks of such an event: its time within bounds, no NUL, the
        // payload's limits and what the database can store. (Its shape is the payload's.)
        // (A leap second, which only a log record's `event.timestamp` could name, is read
        // back as the JSON door would read it.)
        let in_time =
            self.time_error(s.at).is_none() && s.at.timestamp_subsec_nanos() < 1_000_000_000;
        let nul = s.has_unstorable();
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
            return self
                .envelope(index, s.into_json())
                .map(|e| e.map_data(Data::Json));
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
            data: Data::Typed(Payload::MetricSample(s.sample)),
        })
    }

    /// [`IngestContext::envelope`] of a client event, then the tenant's drops (see
    /// [`super::privacy`]): the prompt's text before the event is read, arguments after.
    pub fn stamp(
        &self,
        index: usize,
        mut raw: Value,
        keep: Keep,
    ) -> Result<Stamped, Vec<FieldError>> {
        if !keep.prompts {
            drop_prompt_text(&mut raw);
        }
        let mut env = self.envelope(index, raw)?.map_data(Data::Json);
        if !keep.commands {
            drop_stamped_command_text(&mut env);
        }
        Ok(env)
    }

    /// [`IngestContext::stamp`] of one client event's JSON text: the same envelope after the
    /// same drops, read without building the event's tree when its text is as the contract
    /// writes it ([`Payload::from_text`]) — every field known and valid, the current schema
    /// version, an id given or not derived from the content. `None` when the event is to be read as a tree: to name what is wrong with it,
    /// or to upcast it, keep its unknown fields in `extra` or derive its id from its content.
    pub fn stamp_text(&self, index: usize, text: &str, keep: Keep) -> Option<Stamped> {
        // serde_json reads a struct from an array too, by position; the tree refuses it.
        if !text.trim_start().starts_with('{') {
            return None;
        }
        let client: ClientText = serde_json::from_str(text).ok()?;
        let event_type = EventType::parse(&client.event_type).filter(|t| t.from_clients())?;
        if client
            .schema_version
            .is_some_and(|v| v != event_type.current_version())
        {
            return None;
        }
        let occurred_at = DateTime::parse_from_rfc3339(&client.occurred_at)
            .ok()?
            .with_timezone(&Utc);
        if self.time_error(occurred_at).is_some()
            || self.context_age_error(event_type, occurred_at).is_some()
        {
            return None;
        }
        let id = match client.id {
            Some(id) => Uuid::parse_str(&id).ok().filter(|id| !id.is_nil())?,
            None => match self.ids {
                Ids::Content => return None,
                Ids::Fresh | Ids::Idempotency(_) => self.default_id(index, Uuid::nil),
            },
        };
        let mut payload = Payload::from_text(event_type, client.data.get())?;
        if !check_storable(&payload, "data").is_empty() {
            return None;
        }
        // After the checks, which the tree's drop precedes: dropping cannot fail one.
        if let (false, Payload::MetricSample(sample)) = (keep.prompts, &mut payload) {
            drop_sample_prompt(sample);
        }
        let mut env = Envelope {
            id,
            tenant_id: self.tenant_id,
            event_type,
            schema_version: event_type.current_version(),
            occurred_at,
            received_at: self.received_at,
            actor: self.actor.clone(),
            source: self.source,
            data: Data::Typed(payload),
        };
        if !keep.commands {
            drop_stamped_command_text(&mut env);
        }
        Some(env)
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
                    errors.extend(self.time_error(t));
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
        if let (Some(t), Some(at)) = (event_type, occurred_at) {
            errors.extend(self.context_age_error(t, at));
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
                let nul = unstorable_paths(&data, "data");
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

    /// Every event stamped, from its text where it can be and otherwise from its tree; `None`
    /// if one is not JSON a tree can hold (a number out of range), which the body's tree names,
    /// or nests deeper than [`MAX_EVENT_NESTING`], which the body's tree counts with the
    /// body's own level.
    pub fn stamp_texts(
        &self,
        texts: &[&RawValue],
        keep: Keep,
    ) -> Option<Result<Vec<Stamped>, Vec<FieldError>>> {
        self.stamp_texts_into(texts, keep, Vec::with_capacity(texts.len()))
    }

    /// [`IngestContext::stamp_texts`] into `into`, an envelope at a time
    /// ([`whole_batch`]).
    pub fn stamp_texts_into<B: Extend<Stamped>>(
        &self,
        texts: &[&RawValue],
        keep: Keep,
        into: B,
    ) -> Option<Result<B, Vec<FieldError>>> {
        let mut unreadable = false;
        let batch = whole_batch(
            texts.iter().enumerate().map_while(|(i, text)| {
                Some(match self.stamp_text(i, text.get(), keep) {
                    Some(env) => Ok(env),
                    None => {
                        let tree = serde_json::from_str::<Value>(text.get())
                            .ok()
                            .filter(|tree| nesting(tree) <= MAX_EVENT_NESTING);
                        let Some(tree) = tree else {
                            unreadable = true;
                            return None;
                        };
                        self.stamp(i, tree, keep)
                    }
                })
            }),
            into,
        );
        (!unreadable).then_some(batch)
    }

    /// Every event of a batch read as a tree, stamped ([`IngestContext::stamp`]).
    pub fn stamp_trees(
        &self,
        events: Vec<Value>,
        keep: Keep,
    ) -> Result<Vec<Stamped>, Vec<FieldError>> {
        let n = events.len();
        self.stamp_trees_into(events, keep, Vec::with_capacity(n))
    }

    /// [`IngestContext::stamp_trees`] into `into`, an envelope at a time
    /// ([`whole_batch`]).
    pub fn stamp_trees_into<B: Extend<Stamped>>(
        &self,
        events: Vec<Value>,
        keep: Keep,
        into: B,
    ) -> Result<B, Vec<FieldError>> {
        whole_batch(
            events
                .into_iter()
                .enumerate()
                .map(|(i, raw)| self.stamp(i, raw, keep)),
            into,
        )
    }

    /// What is wrong with an event's time: too far in the future or older than the window.
    fn time_error(&self, t: DateTime<Utc>) -> Option<FieldError> {
        if t > self.received_at + self.bounds.max_future_skew {
            Some(FieldError::new(
                "occurred_at",
                format!(
                    "is more than {} s in the future",
                    self.bounds.max_future_skew.num_seconds()
                ),
            ))
        } else if t < self.received_at - self.bounds.retention {
            Some(FieldError::new(
                "occurred_at",
                format!(
                    "is older than the retention window of {} days",
                    self.bounds.retention.num_days()
                ),
            ))
        } else {
            None
        }
    }

    /// A context re-attributes its session's usage from its time on: it must be recent.
    fn context_age_error(&self, event_type: EventType, t: DateTime<Utc>) -> Option<FieldError> {
        (event_type == EventType::SessionContext && t < self.received_at - MAX_CONTEXT_AGE).then(
            || {
                FieldError::new(
                    "occurred_at",
                    format!(
                        "a session.context may be at most {} minutes old",
                        MAX_CONTEXT_AGE.num_minutes()
                    ),
                )
            },
        )
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
    use shared::events::MAX_TEXT_NESTING;

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
            with(&|s| s.sample.value = -1e200),
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
            label("$serde_json::private::RawValue", "x".into()),
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
                s.sample
                    .extra
                    .insert("$serde_json::private::RawValue".into(), json!("[]"));
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
                let typed = ctx
                    .client_envelope(i, ClientEvent::Sample(sample.clone()))
                    .map(|e| written(&e));
                let json = ctx
                    .envelope(i, sample.clone().into_json())
                    .map(|e| written(&e.map_data(Data::Json)));
                assert_eq!(typed, json, "case {i}: {sample:?}");
                refused += usize::from(typed.is_err());
            }
            assert_eq!(refused, 15, "the cases past a limit");
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

    /// Client events of every kind as text: whether the text path should take each (the
    /// others it leaves to the tree), and the text.
    fn texts() -> Vec<(bool, String)> {
        let at = now();
        let old = (Utc::now() - Duration::hours(3)).to_rfc3339();
        let ev = |id: Option<u128>, t: &str, at: &str, data: Value| {
            let mut e = json!({"type": t, "occurred_at": at, "data": data});
            if let Some(id) = id {
                e["id"] = json!(Uuid::from_u128(id));
            }
            e.to_string()
        };
        let cmd = json!({"user_id": "u1", "session_id": "s1", "team_id": "t", "command_name": "build",
                         "duration_ms": 12, "status": "success", "args": {"verbose": true},
                         "context": {"cwd": "/repo", "command_line": "build -v"}});
        let mut fast = vec![
            ev(Some(1), "command.executed", &at, cmd.clone()),
            ev(
                None,
                "command.executed",
                &at,
                json!({"user_id": "u1", "command_name": "b",
                "duration_ms": 1, "status": "error", "error_message": "caf\u{e9} \"q\" \\ \u{1F600}",
                "extra": {"kept": 1, "tool_input": "x"}}),
            ),
            // Only argument-like keys in `extra`: their drop leaves no `extra`.
            ev(
                Some(2),
                "command.executed",
                &at,
                json!({"user_id": "u1", "command_name": "b",
                "duration_ms": 1, "status": "success", "extra": {"args": "-rf"}}),
            ),
            ev(
                Some(3),
                "agent.interacted",
                &at,
                json!({"user_id": "u1", "agent_name": "claude",
                "interaction_type": "chat", "input_tokens": 10, "output_tokens": 5,
                "model": "opus", "cost_usd": 0.25, "duration_ms": 7, "status": "success",
                "metadata": {"tool_input": "x", "a": 1.5e-7}}),
            ),
            ev(
                Some(4),
                "tool.executed",
                &at,
                json!({"user_id": "u1", "session_id": "s1",
                "tool_name": "Bash", "duration_ms": 3, "success": true,
                "details": {"command": "cat x", "tool_use_id": "t"}}),
            ),
            ev(
                Some(12),
                "tool.executed",
                &at,
                json!({"user_id": "u1", "session_id": "s1", "tool_name": "Bash", "duration_ms": 3,
                "success": true, "details": {"env": {"command_line": "deploy --token t"}},
                "extra": {"steps": [{"command": "rm"}, "plain"]}}),
            ),
            ev(
                Some(5),
                "session.started",
                &at,
                json!({"user_id": "u1", "session_id": "s1",
                "context": {"cwd": "/r"}}),
            ),
            ev(
                Some(6),
                "session.ended",
                &at,
                json!({"user_id": "u1", "session_id": "s1",
                "commands_executed": 4, "agents_used": ["claude"], "productivity_score": 80}),
            ),
            ev(
                Some(7),
                "session.context",
                &at,
                json!({"user_id": "u1", "session_id": "s1",
                "repository": "git@github.com:Acme/Widgets.git", "branch": "main"}),
            ),
            ev(
                Some(8),
                "productivity.recorded",
                &at,
                json!({"user_id": "u1",
                "metric_type": "commands_per_hour", "value": 12, "unit": "per_hour"}),
            ),
            ev(
                Some(9),
                "metric.sample",
                &at,
                json!({"name": "claude_code.token.usage",
                "labels": {"user.id": "u1", "command": "ls"}, "value": 100, "kind": "counter"}),
            ),
            ev(
                Some(10),
                "metric.sample",
                &at,
                json!({"name": "claude_code.user_prompt",
                "labels": {"prompt": "secret", "user.id": "u1"}, "value": 1,
                "extra": {"prompt": "secret", "prompt_length": 6}}),
            ),
            r#"{ "data" : { "user_id" : "u\u0031", "session_id": "s1", "tool_name": "T",
                "duration_ms": 3, "success": false }, "type": "tool.executed",
                "schema_version": 1, "id": null, "occurred_at": "OCC" }"#
                .replace("OCC", &at),
            ev(
                Some(11),
                "session.context",
                &old,
                json!({"user_id": "u1", "session_id": "s1"}),
            )
            .replace("session.context", "session.started"),
        ];
        let slow = vec![
            // Unknown fields, in `data` or beside it; an older schema version.
            ev(Some(20), "command.executed", &at, json!({"user_id": "u1", "command_name": "b",
                "duration_ms": 1, "status": "success", "mystery": {"command": "x"}})),
            ev(Some(21), "metric.sample", &at, json!({"name": "n", "value": 1}))
                .replacen('{', r#"{"extra_field": 1, "#, 1),
            ev(Some(22), "agent.interacted", &at, json!({"user_id": "u1", "agent_name": "a",
                "interaction_type": "chat", "duration_ms": 7, "status": "success",
                "metadata": {"model": "opus", "cost_usd": 0.5}}))
                .replacen('{', r#"{"schema_version": 1, "#, 1),
            ev(Some(23), "metric.sample", &at, json!({"name": "claude_code.user_prompt",
                "value": 1, "prompt": "top-level"})),
            // What the door refuses.
            ev(Some(24), "metric.sample", &at, json!({"name": "n\u{0}", "value": 1})),
            ev(Some(25), "metric.sample", &at, json!({"name": "n", "value": 1,
                "labels": {"a": "\\u0000 is text here"}})),
            ev(Some(26), "command.executed", &at, json!({"user_id": "", "command_name": "b",
                "duration_ms": -1, "status": "success"})),
            ev(Some(27), "metric.sample", &(Utc::now() + Duration::hours(1)).to_rfc3339(),
                json!({"name": "n", "value": 1})),
            ev(Some(28), "session.context", &old, json!({"user_id": "u1", "session_id": "s1"})),
            ev(Some(29), "session.context", &at, json!({"user_id": "u1", "session_id": "s1",
                "repository": "not a repository"})),
            ev(Some(30), "nope.nope", &at, json!({})),
            ev(Some(31), "user.logged_in", &at, json!({})),
            ev(Some(0), "metric.sample", &at, json!({"name": "n", "value": 1})),
            ev(None, "metric.sample", "yesterday", json!({"name": "n", "value": 1})),
            ev(Some(32), "metric.sample", &at, json!({"name": "n", "value": "1"})),
            r#"{"id": "x", "type": "metric.sample", "occurred_at": "OCC", "data": {"name": "n", "value": 1}}"#
                .replace("OCC", &at),
            r#"{"type": "metric.sample", "occurred_at": "OCC", "data": {"name": "n", "name": "m", "value": 1}}"#
                .replace("OCC", &at),
            r#"{"type": "metric.sample", "type": "metric.sample", "occurred_at": "OCC", "data": {"name": "n", "value": 1}}"#
                .replace("OCC", &at),
            r#"{"type": "metric.sample", "occurred_at": "OCC", "data": {"name": "n", "value": 1e400}}"#
                .replace("OCC", &at),
            r#"{"type": "metric.sample", "occurred_at": "OCC", "data": {"name": "\ud800", "value": 1}}"#
                .replace("OCC", &at),
            r#"{"type": "metric.sample", "occurred_at": "OCC", "data": ["name"]}"#.replace("OCC", &at),
            r#"["type"]"#.to_string(),
            // serde_json reads structs from arrays, by position; the contract does not.
            r#"[null, "session.started", "OCC", null, {"session_id": "s1", "user_id": "u1"}]"#
                .replace("OCC", &at),
            r#"{"type": "session.started", "occurred_at": "OCC", "data": ["s1", "u1"]}"#
                .replace("OCC", &at),
        ];
        let mut all: Vec<(bool, String)> = fast.drain(..).map(|t| (true, t)).collect();
        all.extend(slow.into_iter().map(|t| (false, t)));
        all
    }

    /// An event read from its text is stamped as its tree is — the same id, envelope and
    /// written JSON, after the same drops — and the text is left to the tree whenever the
    /// tree has more to do than read it.
    #[test]
    fn texts_are_stamped_as_their_trees_are() {
        let keeps = [(false, false), (true, false), (false, true), (true, true)]
            .map(|(prompts, commands)| Keep { prompts, commands });
        for ids in [Ids::Idempotency("k".into()), Ids::Content] {
            let ctx = IngestContext {
                ids: ids.clone(),
                ..ctx()
            };
            for (i, (fast, text)) in texts().into_iter().enumerate() {
                for keep in keeps {
                    let typed = ctx.stamp_text(i, &text, keep);
                    let tree = serde_json::from_str(&text)
                        .ok()
                        .map(|v| ctx.stamp(i, v, keep));
                    let no_id = !text.contains("\"id\":\"") && !text.contains("\"id\": \"");
                    let expected = fast && !(ids == Ids::Content && no_id);
                    assert_eq!(typed.is_some(), expected, "case {i} {ids:?}: {text}");
                    let Some(typed) = typed else { continue };
                    let Some(Ok(tree)) = tree else {
                        panic!("case {i}: taken from its text, refused as a tree: {tree:?}")
                    };
                    assert_eq!(written(&typed), written(&tree), "case {i} {keep:?}: {text}");
                    assert_eq!(typed.kafka_key(), tree.kafka_key());
                    let tree = tree.map_data(Data::into_value);
                    assert_eq!(typed.map_data(Data::into_value), tree);
                }
            }
        }
    }

    /// A body's events are all read from their text or, if one is not JSON a tree can
    /// hold, none is.
    #[test]
    fn a_body_is_read_from_its_text_or_not_at_all() {
        let ctx = IngestContext {
            ids: Ids::Idempotency("k".into()),
            ..ctx()
        };
        let keep = Keep {
            prompts: false,
            commands: false,
        };
        let events: Vec<String> = texts().into_iter().map(|(_, t)| t).collect();
        let body = format!("[{}]", events.join(","));
        let texts = event_texts(body.as_bytes(), 1000).expect("an array of events");
        assert_eq!(texts.len(), events.len());
        assert!(ctx.stamp_texts(&texts, keep).is_none(), "1e400 is no f64");
        let unreadable = |t: &str| t.contains("1e400") || t.contains("\\ud800");
        let readable: Vec<&String> = events.iter().filter(|t| !unreadable(t)).collect();
        assert_eq!(readable.len() + 2, events.len());
        let body = format!(
            "[{}]",
            readable
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        let texts = event_texts(body.as_bytes(), 1000).expect("an array of events");
        let Some(Err(errors)) = ctx.stamp_texts(&texts, keep) else {
            panic!("some events are refused")
        };
        let tree: Vec<FieldError> = readable
            .iter()
            .enumerate()
            .filter_map(|(i, t)| ctx.stamp(i, serde_json::from_str(t).unwrap(), keep).err())
            .flatten()
            .collect();
        assert_eq!(errors, tree);
        let one = &readable[0];
        assert_eq!(
            event_texts(format!(" \n{one}").as_bytes(), 1).map(|t| t.len()),
            Some(1)
        );
        for other in ["[]", "5", "\"x\"", "", "[{}] x", "{"] {
            assert!(event_texts(other.as_bytes(), 1000).is_none(), "{other}");
        }
        assert!(
            event_texts(b"[{}, {}]", 1).is_none(),
            "more than the batch holds"
        );
    }

    /// A payload nested deeper than its text may be is read as a tree, and an event deeper
    /// than its own tree may be is left to the body's, which refuses what serde_json could
    /// not read back from the log.
    #[test]
    fn deep_events_are_read_as_trees() {
        let ctx = ctx();
        let keep = Keep {
            prompts: false,
            commands: false,
        };
        let at = now();
        let deep = |depth: usize, field: &str| {
            let nested = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
            let data = match field {
                "args" => format!(
                    r#"{{"user_id": "u", "command_name": "b", "duration_ms": 1, "status": "success", "args": {{"x": {nested}}}}}"#
                ),
                _ => format!(r#"{{"name": "n", "value": 1, "extra": {{"x": {nested}}}}}"#),
            };
            let t = if field == "args" {
                "command.executed"
            } else {
                "metric.sample"
            };
            format!(r#"[{{"type": "{t}", "occurred_at": "{at}", "data": {data}}}]"#)
        };
        let stamped = |body: &str| {
            let texts = event_texts(body.as_bytes(), 10).expect("a batch");
            (
                ctx.stamp_text(0, texts[0].get(), keep).is_some(),
                ctx.stamp_texts(&texts, keep),
            )
        };
        for field in ["extra", "args"] {
            let (fast, all) = stamped(&deep(MAX_TEXT_NESTING, field));
            assert!(fast && matches!(all, Some(Ok(_))), "{field}");
            let (fast, all) = stamped(&deep(MAX_TEXT_NESTING + 1, field));
            assert!(
                !fast && matches!(all, Some(Ok(_))),
                "{field}: read as its tree"
            );
        }
        // The event, `data` and `extra` are three levels.
        let (_, all) = stamped(&deep(MAX_EVENT_NESTING - 3, "extra"));
        assert!(matches!(all, Some(Ok(_))));
        let past = deep(MAX_EVENT_NESTING - 2, "extra");
        assert!(stamped(&past).1.is_none(), "left to the body's tree");
        assert!(
            serde_json::from_str::<Value>(&past).is_ok(),
            "which takes it"
        );
        let too_deep = deep(125, "extra");
        assert!(stamped(&too_deep).1.is_none());
        assert!(serde_json::from_str::<Value>(&too_deep).is_err());
        assert_eq!(
            [
                json!(1),
                json!([]),
                json!({"a": [1, {"b": {}}]}),
                json!([[], [[1]]])
            ]
            .map(|v| nesting(&v)),
            [0, 1, 4, 3]
        );
    }
}
