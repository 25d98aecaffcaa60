//! The CPU one JSON event or OTLP point costs ingest-api between its body and the Kafka
//! producer: parsing the request, validating and stamping each event, serializing the
//! envelopes. No HTTP, no broker, one thread, so a profile of it (`perf record`) shows that
//! part alone.
//!
//! `cargo run --release -p tally-tests --example ingest_cpu [ROUNDS] [otlp]` prints µs per
//! event for each round of 200 000 live-shaped events (requests of 1 000, as `make load`
//! makes them). With `otlp`, the events are the points of protobuf requests (`make load
//! FORMAT=otlp`'s) at fixed times, and each round also prints a digest of the envelopes
//! written, each read back as the projector reads it: a change to the OTLP door that must
//! not change what it stores (the points' content-derived ids above all) shows the same
//! digest before and after.

use std::hash::Hasher;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use ingest_api::formats::otlp::{self, Encoding, Metrics, Signal};
use ingest_api::ingest::envelope::event_texts;
use ingest_api::ingest::sink::Batching;
use ingest_api::ingest::values;
use ingest_api::ingest::{Ids, IngestContext, Keep, TimeBounds};
use prost::Message;
use shared::events::{Actor, Envelope, Source};
use shared::tenant::TenantId;
use tally_tests::events::{token_points, Generator};

const REQUESTS: usize = 20;
const EVENTS_PER_REQUEST: usize = 1_000;
const REPEATS: usize = 10;
/// A tenant's privacy as it is by default: neither prompts nor command text stored.
const KEEP_NOTHING: Keep = Keep {
    prompts: false,
    commands: false,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(5);
    if args.next().as_deref() == Some("otlp") {
        otlp_rounds(rounds);
    } else {
        json_rounds(rounds);
    }
}

fn json_rounds(rounds: usize) {
    let mut events = Generator::new(1, "cpu", 50, Duration::hours(2)).live();
    let bodies: Vec<Vec<u8>> = (0..REQUESTS)
        .map(|_| serde_json::to_vec(&events.batch(EVENTS_PER_REQUEST)).expect("serializes"))
        .collect();
    let ctx = context(Utc::now(), Ids::Fresh, Source::Api);
    let body_bytes = bodies.iter().map(Vec::len).sum::<usize>() / bodies.len();
    println!("{EVENTS_PER_REQUEST} events a request: {body_bytes} bytes of JSON");
    for round in 0..rounds {
        let started = Instant::now();
        let mut bytes = 0;
        for body in (0..REPEATS).flat_map(|_| &bodies) {
            values::check(body).expect("within the door's bounds");
            let texts = event_texts(body, EVENTS_PER_REQUEST).expect("a batch of events");
            // As the door does: each event serialized into the batch as it is stamped.
            let into = Batching::with_capacity(texts.len());
            let batch = ctx
                .stamp_texts_into(&texts, KEEP_NOTHING, into)
                .expect("JSON a tree holds")
                .expect("valid events")
                .finish()
                .expect("serializes");
            bytes += batch.payloads().map(<[u8]>::len).sum::<usize>();
        }
        report(round, started.elapsed(), bytes, None);
    }
}

/// As `routes::otlp` takes a request, but for the HTTP around it and the producer after it
/// (and the tenant's drops of prompts and command text, which the protobuf's token points
/// do not carry).
fn otlp_rounds(rounds: usize) {
    let at: DateTime<Utc> = "2026-12-01T12:00:00Z".parse().expect("a time");
    let now = at.timestamp_nanos_opt().expect("fits") as u64;
    let bodies: Vec<Vec<u8>> = (0..REQUESTS)
        .map(|r| {
            token_points(
                EVENTS_PER_REQUEST,
                r * EVENTS_PER_REQUEST,
                Duration::minutes(1),
                now,
            )
            .encode_to_vec()
        })
        .collect();
    let ctx = context(at + Duration::seconds(1), Ids::Content, Source::Otlp);
    for round in 0..rounds {
        let mut spent = std::time::Duration::ZERO;
        let (mut bytes, mut digest) = (0, std::hash::DefaultHasher::new());
        for body in (0..REPEATS).flat_map(|_| &bodies) {
            let started = Instant::now();
            let req = otlp::decode::<Metrics>(body, Encoding::Protobuf).expect("decodes");
            let converted = Metrics::events(&req, at).expect("converts");
            assert!(converted.rejected.is_empty(), "every point is taken");
            let mut batch = Batching::with_capacity(converted.events.len());
            batch.extend(
                converted
                    .events
                    .into_iter()
                    .enumerate()
                    .map(|(i, raw)| ctx.client_envelope(i, raw).expect("a valid event")),
            );
            let batch = batch.finish().expect("serializes");
            spent += started.elapsed();
            // Digested as the projector reads them and written again (untimed): the same
            // digest however the door orders the keys of `data`.
            for envelope in batch.payloads() {
                bytes += envelope.len();
                let read: Envelope = serde_json::from_slice(envelope).expect("reads back");
                digest.write(&serde_json::to_vec(&read).expect("serializes"));
            }
        }
        report(round, spent, bytes, Some(digest.finish()));
    }
}

fn context(received_at: DateTime<Utc>, ids: Ids, source: Source) -> IngestContext {
    IngestContext {
        tenant_id: TenantId(uuid::Uuid::from_u128(1)),
        actor: Actor::default(),
        source,
        received_at,
        bounds: TimeBounds::default(),
        ids,
    }
}

fn report(round: usize, spent: std::time::Duration, bytes: usize, digest: Option<u64>) {
    let n = REPEATS * REQUESTS * EVENTS_PER_REQUEST;
    print!(
        "round {round}: {:.2} µs/event, {} bytes per envelope",
        spent.as_secs_f64() * 1e6 / n as f64,
        bytes / n
    );
    match digest {
        Some(d) => println!(", digest {d:016x}"),
        None => println!(),
    }
}
