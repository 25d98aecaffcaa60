//! `tally-bench-read`: the read-side benchmark. Loads N events spread over D days into a new
//! tenant — raw rows and rollups built by the projector's own code (`RawRow::from_event`,
//! `rollups::fold`, `tenant_wide`, `active_users`) and written with COPY, i.e. exactly what projecting them would leave,
//! without waiting hours for it — then measures query-api's overview and a D-day hourly time
//! series, uncached (a fresh watermark before every request, as after each projector batch)
//! and cached, and compares them with a Redis GET of the same answer (the floor). Ends with the
//! raw tables' size; with TimescaleDB, compresses them and reports the storage ratio. The
//! uncached and cached p99s go to the bench report too ([`tally_tests::report`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use chrono::{DurationRound, TimeDelta, Utc};
use clap::Parser;
use ingest_api::ingest::{IngestContext, TimeBounds};
use projector::models::raw::{self, RawRow};
use projector::models::rollups::{self, Cube, Grain, Key, Measures};
use projector::schema::{self, partitions};
use shared::apikey::Scope;
use shared::events::{Actor, Source};
use shared::tenant::TenantId;
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

fn csv_text(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
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
    println!("| request | uncached p50 | uncached p99 | cached p50 | cached p99 | Redis GET of the answer p50 | cached / Redis |");
    println!("|---|---|---|---|---|---|---|");
    let data = format!("{} events", report::grouped(args.events as u64));
    // The goals: uncached p99 ≤ 25 ms at 10 M events and ≤ 50 ms at 100 M.
    let uncached_goal = match args.events {
        n if n >= 100_000_000 => "≤ 50 ms",
        _ => "≤ 25 ms",
    };
    for (label, path) in [
        (
            format!("overview, {} days", args.days),
            format!("overview?range={}d", args.days),
        ),
        (
            format!("time series, {} days, hourly", args.days),
            format!("timeseries?range={}d&bucket=1h", args.days),
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
            let (t, cache, _) = get(&client, &url, &key).await?;
            anyhow::ensure!(cache == "miss", "expected a cache miss, got {cache}");
            uncached.push(t);
        }
        let mut cached = Vec::new();
        let mut body = Vec::new();
        for _ in 0..args.requests {
            let (t, cache, b) = get(&client, &url, &key).await?;
            anyhow::ensure!(cache == "hit", "expected a cache hit, got {cache}");
            cached.push(t);
            body = b;
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
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
        println!(
            "| {label} | {} | {} | {} | {} | {} | {:.1} × |",
            ms(pct(&mut uncached, 0.5)),
            ms(pct(&mut uncached, 0.99)),
            ms(pct(&mut cached, 0.5)),
            ms(pct(&mut cached, 0.99)),
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

async fn get(
    client: &reqwest::Client,
    url: &str,
    key: &str,
) -> anyhow::Result<(Duration, String, Vec<u8>)> {
    let t = Instant::now();
    let res = client.get(url).bearer_auth(key).send().await?;
    anyhow::ensure!(res.status() == 200, "{url}: {}", res.status());
    let cache = res
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = res.bytes().await?.to_vec();
    Ok((t.elapsed(), cache, body))
}

/// Writes the tenant's projection day by day: raw rows, then that day's minute and hour
/// rollups; daily rollups at the end.
async fn load(pool: &sqlx::PgPool, tenant: TenantId, args: &Args) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    schema::create_tenant_schema(&mut conn, tenant, 1).await?;
    let schema = tenant.schema(1);
    let now = Utc::now();
    let days: Vec<_> = (0..=args.days + 1)
        .map(|d| (now - TimeDelta::days(d)).date_naive())
        .collect();
    partitions::ensure_partitions(&mut conn, &schema, &days).await?;
    let per_day = args.events / args.days as usize;
    let midnight = now
        .duration_trunc(TimeDelta::days(1))
        .expect("a day fits in a timestamp");
    let mut daily: BTreeMap<Key, Measures> = BTreeMap::new();
    let ctx = IngestContext {
        tenant_id: tenant,
        actor: Actor::default(),
        source: Source::Api,
        received_at: now,
        bounds: TimeBounds {
            max_future_skew: TimeDelta::days(1),
            retention: TimeDelta::days(3650),
        },
        ids: ingest_api::ingest::Ids::Fresh,
    };
    for day in 0..args.days {
        // The generator spreads a day's events over the 24 hours before now; they are moved
        // to the UTC day that ends `day` days before today's midnight, so that days (and
        // their minute and hour buckets) never overlap.
        let mut generator =
            Generator::new(day as u64, "bench", args.users, chrono::Duration::days(1));
        let end = midnight - TimeDelta::days(day) - TimeDelta::milliseconds(1);
        let shift = generator.now - end;
        let mut decoded = Vec::with_capacity(per_day);
        for (i, raw) in generator.batch(per_day).into_iter().enumerate() {
            let env = ctx.envelope(i, raw).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let payload = env.payload().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            decoded.push((env, payload));
        }
        let mut rows: Vec<RawRow> = Vec::with_capacity(per_day);
        for (env, payload) in &decoded {
            if let Some(mut r) = RawRow::from_event(env, payload) {
                r.occurred_at -= shift;
                rows.push(r);
            }
        }
        for chunk in rows.chunks(50_000) {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            schema::set_search_path(&mut tx, &schema).await?;
            raw::copy(&mut tx, chunk, 1).await?;
            tx.commit().await?;
        }
        for grain in [Grain::Minute, Grain::Hour] {
            write_grain(
                &mut conn,
                &schema,
                grain,
                &rollups::fold(rows.iter(), grain),
            )
            .await?;
        }
        for (k, m) in rollups::fold(rows.iter(), Grain::Day) {
            daily.entry(k).or_default().add(&m);
        }
        println!("  day {}/{}: {} events", day + 1, args.days, rows.len());
    }
    write_grain(&mut conn, &schema, Grain::Day, &daily).await?;
    let total = (per_day as i64) * args.days;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {schema}.projection_state SET seq = seq + 1, events = $1, as_of = now()"
    )))
    .bind(total)
    .execute(&mut *conn)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ANALYZE {schema}.activity_1m, {schema}.activity_1h, {schema}.activity_1d, \
         {schema}.activity_all_1m, {schema}.activity_all_1h, {schema}.activity_all_1d, \
         {schema}.active_users_1m, {schema}.active_users_1h, {schema}.active_users_1d"
    )))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Writes one grain's per-key rollups, and the tenant-wide ones and active users derived from
/// them, as the projector's transaction would have left them.
async fn write_grain(
    conn: &mut sqlx::PgConnection,
    schema: &shared::tenant::SchemaName,
    grain: Grain,
    keyed: &BTreeMap<Key, Measures>,
) -> anyhow::Result<()> {
    write_rollups(conn, schema, grain, Cube::Keys, keyed).await?;
    write_rollups(
        conn,
        schema,
        grain,
        Cube::Tenant,
        &rollups::tenant_wide(keyed),
    )
    .await?;
    write_active_users(
        conn,
        schema,
        grain,
        rollups::active_users(keyed).into_iter(),
    )
    .await
}

/// Writes folded rollups of one grain and cube with COPY, as the projector's upserts would
/// have left them.
async fn write_rollups(
    conn: &mut sqlx::PgConnection,
    schema: &shared::tenant::SchemaName,
    grain: Grain,
    cube: Cube,
    rows: &BTreeMap<Key, Measures>,
) -> anyhow::Result<()> {
    let entries: Vec<(&Key, &Measures)> = rows.iter().collect();
    let (dimensions, columns) = match cube {
        Cube::Keys => (
            true,
            "bucket, event_type, user_id, team_id, project_id, name, ",
        ),
        Cube::Tenant => (false, "bucket, event_type, "),
    };
    let columns = format!(
        "{columns}count, errors, duration_sum, duration_max, input_tokens, output_tokens, \
         value_sum, duration_hist"
    );
    for chunk in entries.chunks(50_000) {
        let mut csv = String::with_capacity(chunk.len() * 200);
        for (k, m) in chunk {
            let used = m
                .duration_hist
                .iter()
                .rposition(|n| *n != 0)
                .map_or(1, |i| i + 1);
            let hist: Vec<String> = m.duration_hist[..used].iter().map(i64::to_string).collect();
            let _ = write!(csv, "{},{},", k.bucket.to_rfc3339(), k.event_type);
            if dimensions {
                let _ = write!(
                    csv,
                    "{},{},{},{},",
                    csv_text(&k.user_id),
                    csv_text(&k.team_id),
                    csv_text(&k.project_id),
                    csv_text(&k.name)
                );
            }
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},\"{{{}}}\"",
                m.count,
                m.errors,
                m.duration_sum,
                m.duration_max,
                m.input_tokens,
                m.output_tokens,
                m.value_sum,
                hist.join(",")
            );
        }
        copy_into(conn, schema, cube.table(grain), &columns, csv).await?;
    }
    Ok(())
}

/// Writes (bucket, user) pairs of one grain with COPY, as the projector records them.
async fn write_active_users<'a>(
    conn: &mut sqlx::PgConnection,
    schema: &shared::tenant::SchemaName,
    grain: Grain,
    users: impl Iterator<Item = (chrono::DateTime<Utc>, &'a str)>,
) -> anyhow::Result<()> {
    let mut csv = String::new();
    for (bucket, user) in users {
        let _ = writeln!(csv, "{},{}", bucket.to_rfc3339(), csv_text(user));
    }
    copy_into(conn, schema, grain.users_table(), "bucket, user_id", csv).await
}

async fn copy_into(
    conn: &mut sqlx::PgConnection,
    schema: &shared::tenant::SchemaName,
    table: &str,
    columns: &str,
    csv: String,
) -> anyhow::Result<()> {
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {schema}.{table} ({columns}) FROM STDIN (FORMAT csv)"
        ))
        .await?;
    copy.send(csv.into_bytes()).await?;
    copy.finish().await?;
    Ok(())
}
