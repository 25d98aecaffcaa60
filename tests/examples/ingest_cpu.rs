//! The CPU one JSON event costs ingest-api between its body and the Kafka producer: parsing
//! the request, validating and stamping each event, serializing the envelopes. No HTTP, no
//! broker, one thread, so a profile of it (`perf record`) shows that part alone.
//!
//! `cargo run --release -p tally-tests --example ingest_cpu [ROUNDS]` prints µs per event for
//! each round of 200 000 live-shaped events (requests of 1 000, as `make load` makes them).

use std::time::Instant;

use ingest_api::ingest::sink::serialize;
use ingest_api::ingest::{Ids, IngestContext, TimeBounds};
use serde_json::Value;
use shared::events::{Actor, Source};
use shared::tenant::TenantId;
use tally_tests::events::Generator;

const REQUESTS: usize = 20;
const EVENTS_PER_REQUEST: usize = 1_000;
const REPEATS: usize = 10;

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let mut events = Generator::new(1, "cpu", 50, chrono::Duration::hours(2)).live();
    let bodies: Vec<Vec<u8>> = (0..REQUESTS)
        .map(|_| serde_json::to_vec(&events.batch(EVENTS_PER_REQUEST)).expect("serializes"))
        .collect();
    let ctx = IngestContext {
        tenant_id: TenantId::new(),
        actor: Actor::default(),
        source: Source::Api,
        received_at: chrono::Utc::now(),
        bounds: TimeBounds::default(),
        ids: Ids::Fresh,
    };
    for round in 0..rounds {
        let started = Instant::now();
        let mut bytes = 0;
        for body in (0..REPEATS).flat_map(|_| &bodies) {
            let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(body) else {
                panic!("the generator makes arrays of events");
            };
            let envelopes = items
                .into_iter()
                .enumerate()
                .map(|(i, raw)| ctx.envelope(i, raw).expect("a valid event"))
                .collect::<Vec<_>>();
            let serialized = serialize(&envelopes).expect("serializes");
            bytes += serialized.iter().map(<[u8]>::len).sum::<usize>();
        }
        let n = REPEATS * REQUESTS * EVENTS_PER_REQUEST;
        println!(
            "round {round}: {:.2} µs/event, {} bytes per envelope",
            started.elapsed().as_secs_f64() * 1e6 / n as f64,
            bytes / n
        );
    }
}
