//! The CPU one record costs the projector's bulk load (`projector replay`) between the bytes
//! Kafka hands it and the `COPY` text PostgreSQL is sent: decoding the envelope and its
//! payload, mapping it to its raw row, and writing the row's `COPY` line. No broker, no
//! database, one thread, with the allocator the projector ships with, so a profile of it
//! (`perf record`) shows that part alone.
//!
//! `cargo run --release -p tally-tests --example projector_cpu [ROUNDS]` prints µs per
//! record for each round of 200 000 backfill-shaped records (`make bench-replay`'s), and a
//! digest of the `COPY` text written: a change that must not change what is stored shows
//! the same digest before and after.

use std::hash::Hasher;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use projector::consumer::decode;
use projector::models::raw::{self, RawRow};
use shared::tenant::TenantId;
use tally_tests::events::Generator;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECORDS: usize = 20_000;
const REPEATS: usize = 10;

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let ctx = tally_tests::bulk::ingest_context(TenantId(uuid::Uuid::from_u128(1)));
    let mut events = Generator::new(7, "cpu", 50, Duration::days(7));
    let at: DateTime<Utc> = "2026-12-01T12:00:00Z".parse().expect("a time");
    // As ingest-api produces them (`bench_replay` too): each envelope serialized alone.
    let records: Vec<Vec<u8>> = events
        .batch(RECORDS)
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let mut env = ctx.envelope(i, raw).expect("a valid event");
            // Fixed ids and times, so that the digest depends on the code alone.
            env.id = uuid::Uuid::from_u128(i as u128);
            env.received_at = at;
            env.occurred_at = at - Duration::seconds(i as i64 * 31);
            serde_json::to_vec(&env).expect("serializes")
        })
        .collect();
    let (mut lines, mut scratch) = (String::new(), String::new());
    for round in 0..rounds {
        let started = Instant::now();
        let (mut bytes, mut digest) = (0, std::hash::DefaultHasher::new());
        for _ in 0..REPEATS {
            let decoded: Vec<_> = records
                .iter()
                .map(|r| decode(Some(r)).expect("decodes"))
                .collect();
            let rows: Vec<RawRow> = decoded
                .iter()
                .filter_map(|d| RawRow::from_event(&d.env, &d.payload))
                .collect();
            for (ord, r) in rows.iter().enumerate() {
                raw::copy_row(&mut lines, &mut scratch, r, ord, 1);
            }
            bytes += lines.len();
            digest.write(lines.as_bytes());
            lines.clear();
        }
        let n = REPEATS * RECORDS;
        println!(
            "round {round}: {:.2} µs/record, {} bytes of COPY text per record, digest {:016x}",
            started.elapsed().as_secs_f64() * 1e6 / n as f64,
            bytes / n,
            digest.finish()
        );
    }
}
