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
//!
//! With `others` (`… projector_cpu 5 others`) it times instead what a replay of one tenant
//! spends on each record of another tenant in the same log, to skip it: the envelope decoded
//! whole and its tenant compared (as before), against `shared::events::may_belong_to`; and
//! what that check adds to each of the replayed tenant's own records, with its key and
//! without.

use std::hash::Hasher;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use projector::consumer::decode;
use projector::models::raw::{self, RawRow};
use shared::events::{may_belong_to, Envelope};
use shared::tenant::TenantId;
use tally_tests::events::Generator;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RECORDS: usize = 20_000;
const REPEATS: usize = 10;

fn main() {
    let rounds: usize = std::env::args().find_map(|a| a.parse().ok()).unwrap_or(5);
    let ctx = tally_tests::bulk::ingest_context(TenantId(uuid::Uuid::from_u128(1)));
    let mut events = Generator::new(7, "cpu", 50, Duration::days(7));
    let at: DateTime<Utc> = "2026-12-01T12:00:00Z".parse().expect("a time");
    // As ingest-api produces them (`bench_replay` too): each envelope serialized alone.
    let (keys, records): (Vec<String>, Vec<Vec<u8>>) = events
        .batch(RECORDS)
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let mut env = ctx.envelope(i, raw).expect("a valid event");
            // Fixed ids and times, so that the digest depends on the code alone.
            env.id = uuid::Uuid::from_u128(i as u128);
            env.received_at = at;
            env.occurred_at = at - Duration::seconds(i as i64 * 31);
            (
                env.kafka_key(),
                serde_json::to_vec(&env).expect("serializes"),
            )
        })
        .unzip();
    if std::env::args().any(|a| a == "others") {
        return others(rounds, &keys, &records);
    }
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

/// Times skipping `records` (all tenant 1's) in a replay of tenant 2, and what the check adds
/// to a replay of tenant 1: each in µs per record.
fn others(rounds: usize, keys: &[String], records: &[Vec<u8>]) {
    let theirs = std::collections::HashSet::from([TenantId(uuid::Uuid::from_u128(2))]);
    let ours = std::collections::HashSet::from([TenantId(uuid::Uuid::from_u128(1))]);
    // `keeps(i)`: whether the replay would decode record `i` whole; `kept` of each round's
    // records are expected to be.
    let time = |keeps: &dyn Fn(usize) -> bool, kept: usize| {
        let started = Instant::now();
        let mut decoded = 0;
        for _ in 0..REPEATS {
            decoded += (0..records.len()).filter(|&i| keeps(i)).count();
        }
        assert_eq!(decoded, kept * REPEATS);
        started.elapsed().as_secs_f64() * 1e6 / (REPEATS * records.len()) as f64
    };
    let n = records.len();
    for round in 0..rounds {
        let whole = time(
            &|i| {
                serde_json::from_slice::<Envelope>(&records[i])
                    .is_ok_and(|e| theirs.contains(&e.tenant_id))
            },
            0,
        );
        let first = time(
            &|i| may_belong_to(&theirs, Some(keys[i].as_bytes()), Some(&records[i])),
            0,
        );
        let own_keyed = time(
            &|i| may_belong_to(&ours, Some(keys[i].as_bytes()), Some(&records[i])),
            n,
        );
        let own_unkeyed = time(&|i| may_belong_to(&ours, None, Some(&records[i])), n);
        println!(
            "round {round}: another tenant's record decoded whole {whole:.3} µs, skipped by its \
             first tenant_id {first:.3} µs; the check on the replayed tenant's own records \
             {own_keyed:.3} µs with their key, {own_unkeyed:.3} µs without"
        );
    }
}
