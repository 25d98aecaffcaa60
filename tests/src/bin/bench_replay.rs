//! `tally-bench-replay`: the rebuild benchmark. Produces N events of a new tenant straight to
//! a scratch pair of topics (as ingest-api would have: the same envelopes and keys), rebuilds
//! the tenant's projection from them with the projector's own replay (`projector::replay`,
//! in this process), checks that every event was projected exactly once, and compares the
//! rate with the raw limit measured in the same run: `COPY` of the same raw rows into the
//! same raw tables (partitioned or hypertables, primary key kept, secondary indexes
//! dropped, as the replay loads them), in batches of 20 000 per transaction. The baseline
//! leaves out what only a projection does: reading and decoding the log, the rollups,
//! sessions and the indexes built at the end.

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{TimeDelta, Utc};
use clap::Parser;
use ingest_api::ingest::IngestContext;
use projector::models::raw::{self, RawRow};
use projector::schema::{self, partitions};
use shared::events::Envelope;
use shared::tenant::TenantId;
use tally_tests::events::Generator;
use tally_tests::report::{self, Figure};

/// The allocator `projector replay` runs with (`projector/src/main.rs`), so that the replay
/// measured here is the one shipped.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000_000)]
    events: usize,
    /// Days the events are spread over (backfill); 0 puts them in the last minute (live).
    #[arg(long, default_value_t = 7)]
    days: i64,
    /// Distinct users sending events.
    #[arg(long, default_value_t = 50)]
    users: usize,
    /// Records of another tenant produced to the same topic for each of the rebuilt tenant's
    /// events, as in a log many tenants share (the replay skips them).
    #[arg(long, default_value_t = 0)]
    others: usize,
    /// Keep the rebuilt tenant (its schema can be large) instead of dropping it.
    #[arg(long)]
    keep: bool,
    #[arg(long, env = "TALLY_DATABASE_URL")]
    database_url: String,
}

/// Events generated, produced and copied per round: bounds the memory at any size.
const CHUNK: usize = 20_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config: projector::Config =
        shared::config::load().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    config.common.topic_prefix = format!("bench-replay-{}.", uuid::Uuid::new_v4().simple());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&args.database_url)
        .await?;
    projector::migrate(&pool, config.timescale).await?;
    let tenant = ingest_api::control::store::create_tenant(&pool, "", "bench-replay").await?;

    let topics = [config.common.metrics_topic(), config.common.auth_topic()];
    shared::kafka::ensure_topics(&config.common, &topics)
        .await
        .context("creating the scratch topics")?;
    println!(
        "tenant {tenant}: producing {} events over {} days to {}…",
        args.events, args.days, topics[0]
    );
    let producer = shared::kafka::producer(&config.common, Duration::from_secs(30))?;
    let produced = Instant::now();
    let mut events = Events::new(tenant, &args);
    // Another tenant's events, never created: a replay of `tenant` reads and skips them.
    let mut others = Events::new(TenantId(uuid::Uuid::new_v4()), &args);
    others.left = args.events * args.others;
    while let Some(chunk) = events.next_chunk()? {
        let mut records = chunk
            .iter()
            .map(|env| Ok((env.kafka_key(), serde_json::to_vec(env)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for _ in 0..args.others {
            for env in others.next_chunk()?.unwrap_or_default() {
                records.push((env.kafka_key(), serde_json::to_vec(&env)?));
            }
        }
        tally_tests::produce_all(&producer, &topics[0], &records).await?;
    }
    println!(
        "produced in {:.0} s ({:.0} events/s)",
        produced.elapsed().as_secs_f64(),
        args.events as f64 / produced.elapsed().as_secs_f64()
    );

    println!("replaying…");
    let mut last = Instant::now();
    let report = projector::replay::replay(
        &config,
        &pool,
        Some(tenant),
        Duration::from_secs(1),
        &mut |p| {
            if last.elapsed() >= Duration::from_secs(10) {
                last = Instant::now();
                println!(
                    "  {}: {} records, {:.0}/s, lag {}",
                    p.phase, p.records, p.rate, p.lag
                );
            }
        },
    )
    .await?;
    let version = report.versions[0].2;
    let counted = check_exactly_once(&pool, tenant, version, args.events).await?;
    println!(
        "replayed {} records in {:.1} s = {:.0} records/s, {:.0} of the tenant's events/s \
         (bulk load {:.1} s, of which folding the rollups {:.1} s and building indexes \
         {:.1} s); {counted} events projected, each once",
        report.records,
        report.seconds,
        report.records_per_sec,
        args.events as f64 / report.seconds,
        report.bulk_secs,
        report.rollup_secs,
        report.index_secs
    );

    if args.others > 0 {
        // A measurement of the skipping alone: no baseline, nothing recorded for the table.
        if !args.keep {
            let mut conn = pool.acquire().await?;
            schema::drop_tenant_schema(&mut conn, tenant, version).await?;
        }
        return Ok(());
    }
    let copy_rate = copy_baseline(&pool, &args).await?;
    println!();
    let shape = if args.days == 0 {
        "live".to_string()
    } else {
        format!("over {} days", args.days)
    };
    println!("| job | figure | raw limit in the same run | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| replay, {} events {shape} | {:.0} events/s | COPY of the same raw rows: {:.0} rows/s | {:.2} × |",
        args.events,
        report.records_per_sec,
        copy_rate,
        report.records_per_sec / copy_rate
    );
    report::record(
        &Figure::new(
            format!(
                "replay, {} events {shape}",
                report::grouped(args.events as u64)
            ),
            report.records_per_sec,
            "events/s",
        )
        .raw("COPY of the same raw rows", copy_rate)
        .goal("≥ 0.7 ×"),
    )?;
    if !args.keep {
        let mut conn = pool.acquire().await?;
        schema::drop_tenant_schema(&mut conn, tenant, version).await?;
    }
    Ok(())
}

/// The benchmark's events, generated chunk by chunk (the same ones again for the baseline:
/// the generator is seeded).
struct Events {
    ctx: IngestContext,
    generator: Generator,
    left: usize,
}

impl Events {
    fn new(tenant: TenantId, args: &Args) -> Events {
        let spread = if args.days == 0 {
            TimeDelta::hours(1)
        } else {
            TimeDelta::days(args.days)
        };
        Events {
            ctx: tally_tests::bulk::ingest_context(tenant),
            generator: match args.days {
                0 => Generator::new(7, "bench", args.users, spread).live(),
                _ => Generator::new(7, "bench", args.users, spread),
            },
            left: args.events,
        }
    }

    fn next_chunk(&mut self) -> anyhow::Result<Option<Vec<Envelope>>> {
        if self.left == 0 {
            return Ok(None);
        }
        let n = self.left.min(CHUNK);
        self.left -= n;
        self.generator
            .batch(n)
            .into_iter()
            .enumerate()
            .map(|(i, raw)| {
                self.ctx
                    .envelope(i, raw)
                    .map_err(|e| anyhow::anyhow!("{e:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Some)
    }
}

/// Every event is in the rebuilt version once: in its raw rows, its watermark and each
/// grain of the tenant-wide rollups.
async fn check_exactly_once(
    pool: &sqlx::PgPool,
    tenant: TenantId,
    version: i32,
    expected: usize,
) -> anyhow::Result<i64> {
    let schema = tenant.schema(version);
    let raw_tables: Vec<String> = schema::RAW_TABLES
        .iter()
        .map(|t| format!("SELECT count(*) AS n FROM {schema}.{t}"))
        .collect();
    let mut counts = vec![(
        "raw rows",
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
            "SELECT sum(n)::bigint FROM ({}) x",
            raw_tables.join(" UNION ALL ")
        )))
        .fetch_one(pool)
        .await?,
    )];
    for (what, sql) in [
        (
            "watermark",
            format!("SELECT events FROM {schema}.projection_state"),
        ),
        (
            "activity_1m",
            format!("SELECT sum(count)::bigint FROM {schema}.activity_1m"),
        ),
        (
            "activity_1d",
            format!("SELECT sum(count)::bigint FROM {schema}.activity_1d"),
        ),
        (
            "activity_all_1h",
            format!("SELECT sum(count)::bigint FROM {schema}.activity_all_1h"),
        ),
    ] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(pool)
            .await?;
        counts.push((what, n));
    }
    for (what, n) in &counts {
        anyhow::ensure!(
            *n == expected as i64,
            "{what}: {n} events projected, {expected} produced"
        );
    }
    Ok(counts[0].1)
}

/// `COPY` of the same raw rows into a scratch tenant's raw tables, secondary indexes
/// dropped, 20 000 rows per pair of transactions on two connections; returns rows per
/// second.
async fn copy_baseline(pool: &sqlx::PgPool, args: &Args) -> anyhow::Result<f64> {
    let scratch = ingest_api::control::store::create_tenant(pool, "", "bench-replay-copy").await?;
    let schema_name = scratch.schema(1);
    let mut conn = pool.acquire().await?;
    let mut conn2 = pool.acquire().await?;
    schema::create_tenant_schema(&mut conn, scratch, 1).await?;
    let today = Utc::now().date_naive();
    let days: Vec<_> = (0..=args.days + 1)
        .map(|d| today - TimeDelta::days(d))
        .collect();
    partitions::ensure_partitions(&mut conn, &schema_name, &days).await?;
    schema::drop_secondary_indexes(&mut conn, &schema_name, &mut Vec::new()).await?;
    println!("baseline: COPY of the same rows…");
    let mut events = Events::new(scratch, args);
    let mut copying = Duration::ZERO;
    let mut rows_copied = 0usize;
    while let Some(chunk) = events.next_chunk()? {
        let decoded: Vec<_> = chunk
            .iter()
            .map(|env| env.payload().map(|p| (env, p)))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let rows: Vec<RawRow> = decoded
            .iter()
            .filter_map(|(env, p)| RawRow::from_event(env, p))
            .collect();
        // On two connections, each copying about half the rows (whole tables), as the
        // replay's bulk load does.
        let [first, second] = raw::halves(&rows);
        let started = Instant::now();
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut tx2 = sqlx::Connection::begin(&mut *conn2).await?;
        schema::set_search_path(&mut tx, &schema_name).await?;
        schema::set_search_path(&mut tx2, &schema_name).await?;
        tokio::try_join!(
            raw::copy(&mut tx, &rows, 1, &first),
            raw::copy(&mut tx2, &rows, 1, &second)
        )?;
        tx.commit().await?;
        tx2.commit().await?;
        copying += started.elapsed();
        rows_copied += rows.len();
    }
    schema::drop_tenant_schema(&mut conn, scratch, 1).await?;
    let rate = rows_copied as f64 / copying.as_secs_f64();
    println!("baseline: {rate:.0} rows/s");
    Ok(rate)
}
