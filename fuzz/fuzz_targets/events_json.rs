//! `POST /v1/events` bodies: the batch parse of `ingest-api/src/routes/events.rs` and the envelope of every
//! event, for a request with and without an `Idempotency-Key`.
#![no_main]

use ingest_api::ingest::Ids;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use shared::events::Source;

/// ingest-api's default `max_batch_events`.
const MAX_BATCH_EVENTS: usize = 1_000;

fuzz_target!(|body: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let events = match value {
        Value::Array(items) => items,
        obj @ Value::Object(_) => vec![obj],
        _ => return,
    };
    if events.is_empty() || events.len() > MAX_BATCH_EVENTS {
        return;
    }
    let keyed = tally_fuzz::context(Source::Api, Ids::Idempotency("fuzz".into()));
    tally_fuzz::envelopes(&keyed, events.clone());
    tally_fuzz::envelopes(&tally_fuzz::context(Source::Api, Ids::Fresh), events);
});
