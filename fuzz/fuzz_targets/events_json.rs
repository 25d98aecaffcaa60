//! `POST /v1/events` bodies: the batch parse of `ingest-api/src/routes/events.rs` and the envelope of every
//! event, read from its text or its tree (the two compared), for a request with and without
//! an `Idempotency-Key`.
#![no_main]

use ingest_api::ingest::Ids;
use libfuzzer_sys::fuzz_target;
use shared::events::Source;

/// ingest-api's default `max_batch_events`.
const MAX_BATCH_EVENTS: usize = 1_000;

fuzz_target!(|body: &[u8]| {
    let keyed = tally_fuzz::context(Source::Api, Ids::Idempotency("fuzz".into()));
    tally_fuzz::events_body(&keyed, body, MAX_BATCH_EVENTS);
    tally_fuzz::events_body(
        &tally_fuzz::context(Source::Api, Ids::Fresh),
        body,
        MAX_BATCH_EVENTS,
    );
});
