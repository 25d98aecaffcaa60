//! What every fuzz target shares: the write side's envelope building, with a fixed clock so
//! the committed seeds (timestamps around 2026-05-31) stay inside the accepted time window.
//!
//! The property checked beyond "no panic": an event the door accepts is one the projector can
//! read back. Every envelope is serialized as ingest-api sends it to Kafka, deserialized as
//! the projector reads it, and its payload decoded again; a failure there would be a 2xx
//! for an event that can only end in the dead-letter queue. And its `data` must be its
//! payload's normalized form, as the projector would build it again.

use chrono::{DateTime, TimeZone, Utc};
use ingest_api::ingest::envelope::{event_texts, written};
use ingest_api::ingest::{values, Data, Ids, IngestContext, Keep, Stamped, TimeBounds};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use shared::events::{Actor, Envelope, Source};
use shared::tenant::TenantId;
use uuid::Uuid;

/// The server's "now" in every target.
pub fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap()
}

/// The context a door builds for a request sent with an API key.
pub fn context(source: Source, ids: Ids) -> IngestContext {
    IngestContext {
        tenant_id: TenantId(Uuid::from_u128(0x0f00_d000_0000_4000_8000_0000_0000_0001)),
        actor: Actor {
            user_id: None,
            api_key_id: Some(Uuid::from_u128(0x0f00_d000_0000_4000_8000_0000_0000_0002)),
        },
        source,
        received_at: now(),
        bounds: TimeBounds::default(),
        ids,
    }
}

/// Builds the envelope of every client event, as the doors do, and checks each accepted one
/// survives the trip through Kafka to the projector. Returns how many were accepted.
pub fn envelopes(ctx: &IngestContext, events: Vec<Value>) -> usize {
    let mut accepted = 0;
    for (i, raw) in events.into_iter().enumerate() {
        match ctx.envelope(i, raw) {
            Ok(env) => {
                round_trip(&env.map_data(Data::Json));
                accepted += 1;
            }
            Err(errors) => assert!(!errors.is_empty(), "a refusal names no field"),
        }
    }
    accepted
}

fn round_trip(env: &Stamped) {
    let bytes = serde_json::to_vec(env).expect("an accepted envelope serializes");
    let back: Envelope =
        serde_json::from_slice(&bytes).expect("the projector reads what ingest-api wrote");
    assert_eq!(
        (back.id, back.event_type, back.schema_version),
        (env.id, env.event_type, env.schema_version)
    );
    assert_eq!(env.kafka_key(), back.kafka_key(), "keyed as its JSON is");
    // The envelope carries its payload's normalized form, whether the client's `data` was
    // kept (it already was that form) or the form was built from the payload.
    let payload = match back.payload() {
        Ok(payload) => payload,
        Err(errors) => panic!("an accepted event fails the projector's decoding: {errors:?}"),
    };
    assert!(payload.is_written_as(&back.data));
    assert_eq!(
        payload.to_value(),
        back.data,
        "data is not its payload's form"
    );
}

/// A `POST /v1/events` body as `routes/events.rs` takes it: every event read from its text
/// where it can be, and otherwise from its tree. For each privacy a tenant may choose, the
/// envelopes (ids aside where they are fresh) and the refusals must be those of the body's
/// tree, event by event, and every accepted envelope must survive the trip to the projector.
pub fn events_body(ctx: &IngestContext, body: &[u8], max: usize) {
    // The door's checks come first: a body over its tree's bound, or holding a key the JSON
    // reader reserves (found exactly as a reader that keeps every key finds it), is refused.
    if let Ok(keys) = keys(body) {
        assert_eq!(
            values::holds_reserved(body),
            keys.iter().any(|k| k.starts_with(values::RESERVED_PREFIX)),
            "reserved keys found as they are: {keys:?}"
        );
    }
    if values::check(body).is_err() {
        return;
    }
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        // A body its tree does not take is not taken from its texts either: the door
        // answers that it is not JSON.
        if let Some(texts) = event_texts(body, max) {
            for prompts in [false, true] {
                let keep = Keep {
                    prompts,
                    commands: prompts,
                };
                assert!(
                    ctx.stamp_texts(&texts, keep).is_none(),
                    "read from its texts, not JSON as a tree"
                );
            }
        }
        return;
    };
    let events = match value {
        Value::Array(items) => items,
        obj @ Value::Object(_) => vec![obj],
        _ => return,
    };
    if events.is_empty() || events.len() > max {
        return;
    }
    let texts = event_texts(body, max).expect("a body its tree takes is split into texts");
    assert_eq!(texts.len(), events.len());
    let fresh = ctx.ids == Ids::Fresh;
    let comparable = |env: &Stamped| {
        let mut env = written(env);
        if fresh {
            env.id = Uuid::nil();
        }
        env
    };
    for (prompts, commands) in [(false, false), (true, true), (false, true)] {
        let keep = Keep { prompts, commands };
        let from_texts = ctx
            .stamp_texts(&texts, keep)
            .expect("events of a body its tree takes are trees too");
        match (from_texts, ctx.stamp_trees(events.clone(), keep)) {
            (Ok(stamped), Ok(envelopes)) => {
                assert_eq!(stamped.len(), envelopes.len());
                for (a, b) in stamped.iter().zip(&envelopes) {
                    assert_eq!(comparable(a), comparable(b), "stamped as its tree is");
                    round_trip(a);
                }
            }
            (Err(refused), Err(errors)) => assert_eq!(refused, errors, "refused as its tree is"),
            (texts, trees) => panic!("taken as {texts:?}, as trees {trees:?}"),
        }
    }
}

/// An OTLP/HTTP export of one signal, as `routes/otlp.rs` takes it: decode, convert (the
/// expansion guard included), build envelopes, answer.
pub fn otlp<S: ingest_api::formats::otlp::Signal>(
    body: &[u8],
    encoding: ingest_api::formats::otlp::Encoding,
) {
    let Ok(req) = ingest_api::formats::otlp::decode::<S>(body, encoding) else {
        return;
    };
    let Ok(mut converted) = S::events(&req, now()) else {
        return;
    };
    assert_eq!(converted.events.len(), converted.origins.len());
    let ctx = context(Source::Otlp, Ids::Content);
    for (i, event) in std::mem::take(&mut converted.events)
        .into_iter()
        .enumerate()
    {
        // A sample built typed is stamped as the JSON door stamps it as JSON.
        let json = ctx.envelope(i, event.clone().into_json());
        let typed = ctx.client_envelope(i, event);
        // Compared as written: serde_json reads a float back a little off at times (no
        // `float_roundtrip`), the same whichever wrote the same text.
        assert_eq!(
            typed.as_ref().map(written).map_err(Vec::clone),
            json.map(|e| written(&e.map_data(Data::Json))),
            "the typed sample's envelope is the JSON door's"
        );
        match typed {
            Ok(env) => round_trip(&env),
            Err(errors) => assert!(!errors.is_empty(), "a refusal names no field"),
        }
    }
    let _ = ingest_api::formats::otlp::encode_response::<S>(&converted, encoding);
}

/// Every object key of the JSON text `body`, read by a visitor of its own: serde_json reads
/// a reserved key as such only for its `Value` and `RawValue`, so these are the keys as
/// written.
fn keys(body: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    struct Keys<'a>(&'a mut Vec<String>);
    impl<'de> DeserializeSeed<'de> for Keys<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Keys<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Keys(&mut *self.0))?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                self.0.push(key);
                map.next_value_seed(Keys(&mut *self.0))?;
            }
            Ok(())
        }
    }
    let mut keys = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    Keys(&mut keys).deserialize(&mut de)?;
    de.end()?;
    Ok(keys)
}
