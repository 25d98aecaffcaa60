//! `tally-bench-read`: the read-side benchmark. Loads N events spread over D days into a new
//! tenant with [`BulkLoad`] — exactly what projecting them would leave, without waiting hours
//! for it (`--raw-days N`: raw rows and minute rollups of the last N days only, as a raw
//! retention of N days leaves them; the dashboards' 30-day reads use hours and days) — then
//! measures query-api's overview and a D-day hourly time
//! series, uncached (a fresh watermark before every request, as after each projector batch)
//! and cached, and compares them with a Redis GET of the same answer (the floor). Requests
//! accept gzip, as the dashboard page's browser does, and the time is to the answer's last
//! byte as sent; cached answers are measured also for a client that does not take gzip
//! (inflated by the service) and revalidated (`If-None-Match`: 304, no body). Ends with the
//! raw tables' size; with TimescaleDB, compresses them and reports the storage ratio. The
//! uncached and cached p99s go to the bench report too ([`tally_tests::report`]).
//!
//! It also measures the cost-by-branch views (`repositories`, by branch, and its daily
//! series). Their data differs from the projector's in one way, said here: instead of hook
//! contexts, each session is given one of 40 repositories and 25 branches per day (a hash of
//! its id and day), and `session_usage`, `repo_usage_1h` and `repo_sessions` are filled
//! set-wise from the loaded agent interactions and tool runs, as the attribution model would
//! fill them from those contexts.

use std::time::{Duration, Instant};

use chrono::{DurationRound, TimeDelta, Utc};
use clap::Parser;
use projector::schema::{self, partitions};
use shared::apikey::Scope;
use shared::tenant::TenantId;
use tally_tests::bulk::BulkLoad;
use tally_tests::events::Generator;
use tally_tests::report::{self, Figure};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000_000)]
    events: usize,
    #[arg(long, default_value_t = 30)]
    days: i64,
    /// Distinct users sending events.
    #[arg(long, default_value_t = 50)]
    users: usize,
    /// Raw rows and minute rollups for the last N days only, as a tenant whose raw retention
    /// is N days holds them (for sizes whose every minute would not fit on the disk).
    #[arg(long)]
    raw_days: Option<i64>,
    /// Requests per measurement.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    query_url: String,
    #[arg(long, env = "TALLY_DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "TALLY_REDIS_URL")]
    redis_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&args.database_url)
        .await?;
    projector::migrate(&pool, projector::schema::timescale::Timescale::Auto).await?;
    let tenant = ingest_api::control::store::create_tenant(&pool, "", "bench-read").await?;
    let (_, key) =
        ingest_api::control::store::create_api_key(&pool, "", tenant, Scope::Read, "bench").await?;
    println!(
        "tenant {tenant}: loading {} events over {} days…",
        args.events, args.days
    );
    let loaded = Instant::now();
    load(&pool, tenant, &args).await?;
    attribute(&pool, tenant).await?;
    println!("loaded in {:.0} s", loaded.elapsed().as_secs_f64());
    let storage_before = {
        let mut conn = pool.acquire().await?;
        Storage::measure(&mut conn, &tenant.schema(1)).await?
    };

    let client = reqwest::Client::new();
    let redis = redis::Client::open(args.redis_url.as_str())?;
    let mut redis = redis::aio::ConnectionManager::new(redis).await?;
    let schema = tenant.schema(1);
    println!();
    println!("| request | uncached p50 | uncached p99 | cached p50 | cached p99 | cached without gzip p99 | revalidated (304) p99 | bytes sent of the JSON's | Redis GET of the answer p50 | cached / Redis |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let data = format!(
        "{} events{}",
        report::grouped(args.events as u64),
        match args.raw_days {
            Some(d) => format!(" (raw and minute rollups of the last {d} days)"),
            None => String::new(),
        }
    );
    // The goals: uncached p99 ≤ 25 ms at 10 M events and ≤ 50 ms at 100 M.
    let uncached_goal = match args.events {
        n if n >= 100_000_000 => "≤ 50 ms",
        _ => "≤ 25 ms",
    };
    // The last `days` days, named once: a relative range (`range=30d`) ends at the next whole
    // minute, so its answers would be asked anew when a minute turns during a measurement.
    let to = Utc::now().duration_trunc(TimeDelta::minutes(1))? + TimeDelta::minutes(1);
    let window = format!(
        "from={}&to={}",
        (to - TimeDelta::days(args.days)).format("%Y-%m-%dT%H:%M:%SZ"),
        to.format("%Y-%m-%dT%H:%M:%SZ")
    );
    for (label, path) in [
        (
            format!("overview, {} days", args.days),
            format!("overview?{window}"),
        ),
        (
            format!("time series, {} days, hourly", args.days),
            format!("timeseries?{window}&bucket=1h"),
        ),
        (
            format!("cost by branch, {} days", args.days),
            format!("repositories?{window}&by=branch"),
        ),
        (
            format!("cost by repository, {} days, daily series", args.days),
            format!("repositories/series?{window}&step=1d"),
        ),
    ] {
        let url = format!("{}/v1/dashboard/{path}", args.query_url);
        let mut uncached = Vec::new();
        for _ in 0..args.requests {
            // A new watermark, announced: the cache key changes, as after every projector
            // batch.
            let seq: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "UPDATE {schema}.projection_state SET seq = seq + 1 RETURNING seq"
            )))
            .fetch_one(&pool)
            .await?;
            shared::watermark::raise(&mut redis, &[(tenant, 1, seq)]).await?;
            let got = get(&client, &url, &key, &[BROWSER]).await?;
            anyhow::ensure!(
                got.cache == "miss",
                "expected a cache miss, got {}",
                got.cache
            );
            uncached.push(got.took);
        }
        let mut cached = Vec::new();
        let mut sent = Got::default();
        for _ in 0..args.requests {
            sent = get(&client, &url, &key, &[BROWSER]).await?;
            anyhow::ensure!(
                sent.cache == "hit",
                "expected a cache hit, got {}",
                sent.cache
            );
            cached.push(sent.took);
        }
        let body = sent.body;
        let mut identity = Vec::new();
        let mut json_len = body.len();
        for _ in 0..args.requests {
            let got = get(&client, &url, &key, &[]).await?;
            anyhow::ensure!(
                got.cache == "hit",
                "expected a cache hit, got {}",
                got.cache
            );
            identity.push(got.took);
            json_len = got.body.len();
        }
        let mut revalidated = Vec::new();
        // (A query-api before validators sends none: nothing to revalidate.)
        for _ in 0..args.requests * usize::from(!sent.etag.is_empty()) {
            let got = get(
                &client,
                &url,
                &key,
                &[BROWSER, ("if-none-match", &sent.etag)],
            )
            .await?;
            anyhow::ensure!(got.status == 304, "expected 304, got {}", got.status);
            revalidated.push(got.took);
        }
        // The floor: a Redis round trip of the same bytes.
        let _: () = redis::cmd("SET")
            .arg("tally:bench:floor")
            .arg(&body)
            .query_async(&mut redis)
            .await?;
        let mut floor = Vec::new();
        for _ in 0..args.requests {
            let t = Instant::now();
            let _: Vec<u8> = redis::cmd("GET")
                .arg("tally:bench:floor")
                .query_async(&mut redis)
                .await?;
            floor.push(t.elapsed());
        }
        // Cached answers and the Redis floor are fractions of a millisecond: two decimals.
        let ms = |d: Duration| match d.as_secs_f64() * 1000.0 {
            ms if ms < 10.0 => format!("{ms:.2} ms"),
            ms => format!("{ms:.1} ms"),
        };
        println!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} of {} | {} | {:.1} × |",
            ms(pct(&mut uncached, 0.5)),
            ms(pct(&mut uncached, 0.99)),
            ms(pct(&mut cached, 0.5)),
            ms(pct(&mut cached, 0.99)),
            ms(pct(&mut identity, 0.99)),
            if revalidated.is_empty() {
                "—".to_string()
            } else {
                ms(pct(&mut revalidated, 0.99))
            },
            report::grouped(body.len() as u64),
            report::grouped(json_len as u64),
            ms(pct(&mut floor, 0.5)),
            pct(&mut cached, 0.5).as_secs_f64() / pct(&mut floor, 0.5).as_secs_f64()
        );
        let millis = |d: Duration| d.as_secs_f64() * 1000.0;
        report::record(
            &Figure::new(
                format!("{label}, {data}, uncached p99"),
                millis(pct(&mut uncached, 0.99)),
                "ms",
            )
            .goal(uncached_goal),
        )?;
        report::record(
            &Figure::new(
                format!("{label}, {data}, cached p99"),
                millis(pct(&mut cached, 0.99)),
                "ms",
            )
            .raw(
                "Redis GET of the same answer, p99",
                millis(pct(&mut floor, 0.99)),
            )
            .goal("≤ 2 ms"),
        )?;
    }
    storage_report(&pool, tenant, storage_before).await
}

/// The raw tables' footprint and a scan of a week of them, in one schema.
struct Storage {
    timescale: bool,
    bytes: i64,
    scan: Duration,
}

impl Storage {
    async fn measure(
        conn: &mut sqlx::PgConnection,
        schema: &shared::tenant::SchemaName,
    ) -> anyhow::Result<Storage> {
        let ts = match schema::uses_timescale(&mut *conn, schema).await? {
            true => schema::timescale_schema(&mut *conn).await?,
            false => None,
        };
        let bytes: Option<i64> = match &ts {
            // Chunks, compressed ones included.
            Some(ts) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT sum({ts}.hypertable_size(format('%I.%I', $1::text, t)::regclass))::bigint
                       FROM unnest($2::text[]) t"
            )))
                .bind(schema.as_str())
                .bind(schema::RAW_TABLES.to_vec())
                .fetch_one(&mut *conn)
                .await?
            }
            None => {
                let parts = partitions::partitions(&mut *conn, schema).await?;
                sqlx::query_scalar(
                    "SELECT sum(pg_total_relation_size(format('%I.%I', $1::text, p)::regclass))::bigint
                       FROM unnest($2::text[]) p",
                )
                .bind(schema.as_str())
                .bind(parts)
                .fetch_one(&mut *conn)
                .await?
            }
        };
        // What a drill-down into raw rows costs: a week of agent interactions, aggregated.
        let t = Instant::now();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*), sum(input_tokens), sum(output_tokens)
               FROM {schema}.agent_interactions WHERE occurred_at >= now() - interval '7 days'"
        )))
        .fetch_one(&mut *conn)
        .await?;
        Ok(Storage {
            timescale: ts.is_some(),
            bytes: bytes.unwrap_or(0),
            scan: t.elapsed(),
        })
    }
}

/// Prints the raw tables' size and scan time; with TimescaleDB, compresses every chunk older
/// than a day (as retention would with `compress_after_days = 1`) and prints them again.
async fn storage_report(
    pool: &sqlx::PgPool,
    tenant: TenantId,
    before: Storage,
) -> anyhow::Result<()> {
    let mib = |b: i64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let path = if before.timescale {
        "TimescaleDB hypertables"
    } else {
        "native partitions"
    };
    println!();
    println!("| raw tables ({path}) | size | scan of 7 days of agent interactions |");
    println!("|---|---|---|");
    println!(
        "| as written | {} | {} |",
        mib(before.bytes),
        ms(before.scan)
    );
    if !before.timescale {
        return Ok(());
    }
    let schema = tenant.schema(1);
    let mut conn = pool.acquire().await?;
    let t = Instant::now();
    let windows = partitions::Windows {
        raw_days: 3650,
        rollup_days: 3650,
        compress_after_days: 1,
        ahead_days: 0,
    };
    let pruned = partitions::apply_retention(&mut conn, &schema, Utc::now().date_naive(), windows)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the schema is busy"))?;
    let took = t.elapsed();
    let after = Storage::measure(&mut conn, &schema).await?;
    println!(
        "| compressed ({} chunks in {:.0} s) | {} | {} |",
        pruned.chunks_compressed,
        took.as_secs_f64(),
        mib(after.bytes),
        ms(after.scan)
    );
    println!(
        "storage ratio: {:.1} × smaller",
        before.bytes as f64 / after.bytes.max(1) as f64
    );
    Ok(())
}

fn pct(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    report::percentile(v, q)
}

/// What Chromium sends (reqwest, built without its decoders, keeps the body as sent).
const BROWSER: (&str, &str) = ("accept-encoding", "gzip, deflate, br, zstd");

/// One answer: its time to the last byte, status, `x-cache`, `ETag` and body as sent.
#[derive(Default)]
struct Got {
    took: Duration,
    status: u16,
    cache: String,
    etag: String,
    body: Vec<u8>,
}

async fn get(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Got> {
    let t = Instant::now();
    let mut req = client.get(url).bearer_auth(key);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = req.send().await?;
    let status = res.status().as_u16();
    anyhow::ensure!(status == 200 || status == 304, "{url}: {status}");
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (cache, etag) = (header("x-cache"), header("etag"));
    let body = res.bytes().await?.to_vec();
    Ok(Got {
        took: t.elapsed(),
        status,
        cache,
        etag,
        body,
    })
}

/// Fills the attribution read models from the loaded raw rows, set-wise: each session works in
/// one of 40 repositories and 25 branches per day (see the module's documentation).
async fn attribute(pool: &sqlx::PgPool, tenant: TenantId) -> anyhow::Result<()> {
    let t = Instant::now();
    let schema = tenant.schema(1);
    let place =
        "'github.com/bench/repo-' || abs(hashtext(session_id || occurred_at::date::text)) % 40,
                 'branch-' || abs(hashtext(occurred_at::date::text || session_id)) % 25";
    for sql in [
        format!(
            "INSERT INTO {schema}.session_usage (session_id, occurred_at, event_id, user_id,
                team_id, requests, cost_usd, input_tokens, output_tokens, repository, branch)
             SELECT session_id, occurred_at, event_id, user_id, team_id, 1, value,
                    input_tokens, output_tokens, {place}
               FROM {schema}.agent_interactions"
        ),
        format!(
            "INSERT INTO {schema}.session_usage (session_id, occurred_at, event_id, user_id,
                team_id, tool_runs, repository, branch)
             SELECT session_id, occurred_at, event_id, user_id, team_id, 1, {place}
               FROM {schema}.tool_executions"
        ),
        format!(
            "INSERT INTO {schema}.repo_usage_1h
             SELECT date_bin('1 hour', occurred_at, TIMESTAMPTZ '2000-01-03 00:00:00+00'),
                    repository, branch, user_id, team_id, sum(requests), sum(tool_runs),
                    sum(cost_usd), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
                    sum(cache_creation_tokens), sum(lines_added), sum(lines_removed)
               FROM {schema}.session_usage GROUP BY 1, 2, 3, 4, 5"
        ),
        format!(
            "INSERT INTO {schema}.repo_usage_1d
             SELECT date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-03 00:00:00+00'), repository,
                    branch, user_id, team_id, sum(requests), sum(tool_runs), sum(cost_usd),
                    sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
                    sum(cache_creation_tokens), sum(lines_added), sum(lines_removed)
               FROM {schema}.repo_usage_1h GROUP BY 1, 2, 3, 4, 5"
        ),
        format!("VACUUM ANALYZE {schema}.repo_usage_1d"),
        format!(
            "INSERT INTO {schema}.repo_sessions
             SELECT repository, branch, session_id, max(user_id), max(team_id), min(occurred_at),
                    max(occurred_at), sum(requests), sum(cost_usd), sum(lines_added)
               FROM {schema}.session_usage GROUP BY repository, branch, session_id"
        ),
        format!("VACUUM ANALYZE {schema}.repo_usage_1h"),
        format!("VACUUM ANALYZE {schema}.repo_sessions"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
    }
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}.repo_usage_1h"
    )))
    .fetch_one(pool)
    .await?;
    println!(
        "  attribution: {rows} hourly repository rows in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes the tenant's projection day by day with [`BulkLoad`]: raw rows (those of the last
/// `--raw-days`), then that day's minute and hour rollups; daily rollups at the end.
async fn load(pool: &sqlx::PgPool, tenant: TenantId, args: &Args) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let now = Utc::now();
    let days: Vec<_> = (0..=args.days + 1)
        .map(|d| (now - TimeDelta::days(d)).date_naive())
        .collect();
    let per_day = args.events / args.days as usize;
    let midnight = now
        .duration_trunc(TimeDelta::days(1))
        .expect("a day fits in a timestamp");
    let raw_since = args.raw_days.map(|d| midnight - TimeDelta::days(d));
    let mut bulk = BulkLoad::new(&mut conn, tenant, &days, raw_since).await?;
    // Events are generated and validated on two threads, each its own seeded generator for
    // half of every day; they are folded and written here, part by part.
    const PART: usize = 250_000;
    for day in 0..args.days {
        // The generators spread a day's events over the 24 hours before now, later than
        // its first millisecond and a minute or more before its end; they are moved to the
        // UTC day that ends `day` days before today's midnight, so that days (and their
        // minute and hour buckets) never overlap. (With the day's end 1 ms earlier, an
        // event drawn at the window's very start fell a fraction of a microsecond before
        // the day once its time was truncated to microseconds, and the day before wrote its
        // last hour again: a duplicate key, about once in 86 million events.)
        let end = midnight - TimeDelta::days(day);
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        for half in 0..2u64 {
            let generator = Generator::new(
                day as u64 * 2 + half,
                "bench",
                args.users,
                chrono::Duration::days(1),
            );
            let shift = generator.now - end;
            let (tx, ctx, n) = (
                tx.clone(),
                tally_tests::bulk::ingest_context(tenant),
                per_day / 2 + (per_day % 2) * half as usize,
            );
            tokio::task::spawn_blocking(move || {
                let mut generator = generator;
                let mut left = n;
                while left > 0 {
                    let k = left.min(PART);
                    left -= k;
                    let part = tally_tests::bulk::decode(&ctx, generator.batch(k));
                    if tx.blocking_send((part, shift)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut written = 0;
        while let Some((part, shift)) = rx.recv().await {
            written += bulk.add_decoded(&mut conn, &part?, shift).await?;
        }
        bulk.flush(&mut conn).await?;
        println!("  day {}/{}: {written} events", day + 1, args.days);
    }
    bulk.finish(&mut conn).await
}
