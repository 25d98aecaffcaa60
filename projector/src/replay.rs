//! `projector replay`: rebuilds tenants' projections from offset 0 into a new version while
//! the current one keeps serving, then switches in one transaction and drops the old one.
//!
//! The switch is safe against the live projector without stopping it:
//! 1. Before reading, every replayed tenant gets a `control.tenant_versions` row, so that the
//!    live projector's batches lock it (`FOR SHARE`) from then on.
//! 2. Once the rebuild is close to the log end, the switch transaction locks those rows
//!    `FOR UPDATE`: live batches touching these tenants wait. It reads the live offsets and
//!    keeps replaying until the new version has every partition at least that far.
//! 3. It flips the versions and commits. The waiting live batches see the new versions and
//!    write there; records the replay already projected are duplicates by event id.
//!
//! So the new version holds everything the old one did when it starts serving: no count
//! goes backwards. The replay's own position lives in memory: if it dies, the next run
//! drops the half-built version and starts over.
//!
//! Up to the log end as it was when the replay started, the rebuild is a bulk load
//! ([`Bulk`]): the new schemas' secondary indexes are dropped, their autovacuum turned off,
//! and raw rows go in by `COPY`, half of each batch's on a second connection
//! ([`batch::Mode::Bulk`]), without rollups and without usage (it is read from the raw rows);
//! once every raw row is in, the rollups are folded set-wise from them, day by day in one sorted pass on two
//! connections, and written by `COPY` into tables without keys ([`rollups::rebuild`]), while
//! the raw rows' usage is placed and its rollups made on a third ([`attribution::rebuild`]);
//! then the keys and indexes are built and autovacuum turned back on. Each bulk batch is
//! written by a task of its own while the next is read. The rest (what arrived since) takes
//! the normal path, batch by batch, before the switch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use shared::events::may_belong_to;
use shared::tenant::TenantId;
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};

use crate::batch::{self, Decoded, Mode, WriteError};
use crate::consumer::Poison;
use crate::models::attribution;
use crate::models::rollups::{self, Grain};
use crate::prepare::{self, Prepared, Target, Versions};
use crate::schema::{self, Lock};
use crate::Config;

/// Shown while a replay runs.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub phase: &'static str,
    /// Records read from the log (every tenant's).
    pub records: u64,
    /// Events of the replayed tenants written into the new version.
    pub projected: u64,
    /// Records read per second so far.
    pub rate: f64,
    /// Records between the replay's position and the log end.
    pub lag: i64,
    pub eta_secs: Option<f64>,
}

/// The result of a replay.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tenants: usize,
    pub records: u64,
    pub projected: u64,
    pub seconds: f64,
    pub records_per_sec: f64,
    /// How long the live projector's batches for these tenants waited on the switch.
    pub switch_ms: f64,
    /// Seconds the bulk load took (up to the log end when the replay started), and of those
    /// the folding of the rollups from the raw rows, and the building of the indexes it
    /// dropped.
    pub bulk_secs: f64,
    pub rollup_secs: f64,
    pub index_secs: f64,
    /// Records of the replayed tenants that could not be projected (today's validation
    /// refuses them, or PostgreSQL does): sent to the dead-letter topics, not dropped.
    pub dead_lettered: u64,
    /// (tenant, old version, new version)
    pub versions: Vec<(TenantId, i32, i32)>,
}

/// A topic-and-partition of the replay's assignment: index into `topics`, partition.
type Tp = (usize, i32);

/// The bulk load of a rebuild: it lasts until every partition is read up to where the log
/// ended when the replay started.
struct Bulk {
    until: HashMap<Tp, i64>,
    /// The days (UTC) each new schema got events of: those the rollups are folded from.
    days: BTreeMap<TenantId, BTreeSet<chrono::DateTime<chrono::Utc>>>,
    /// The secondary indexes dropped from each new schema, built again at the end.
    indexes: BTreeMap<TenantId, Vec<String>>,
    /// The new schemas whose secondary indexes are all dropped.
    dropped: HashSet<TenantId>,
    started: Instant,
}

/// Records per bulk-load batch, in multiples of the live batch size.
const BULK_BATCHES: usize = 4;

struct Switching {
    tx: Transaction<'static, Postgres>,
    live: HashMap<Tp, i64>,
    started: Instant,
}

struct Replayer<'a> {
    config: &'a Config,
    pool: &'a PgPool,
    consumer: StreamConsumer,
    tenants: HashSet<TenantId>,
    /// The topics, the new versions and what writes to them (shared with the bulk-load
    /// write in flight).
    writer: Arc<Writer>,
    prepared: Prepared,
    partitions: Vec<Tp>,
    /// Next offset read per partition (the batch in hand may not be written yet).
    read: HashMap<Tp, i64>,
    /// Next offset written per partition.
    written: HashMap<Tp, i64>,
    batch: Vec<Decoded>,
    /// The bytes of the batch's records as Kafka held them.
    batch_bytes: usize,
    /// The batch's records that cannot be projected, by topic index.
    poison: Vec<(usize, Poison)>,
    /// Connected before the switch, which announces the new versions' watermarks with it
    /// while live batches of those tenants wait.
    redis: Option<redis::aio::ConnectionManager>,
    bulk: Option<Bulk>,
    /// The bulk-load write going on while the next batch is read.
    in_flight: Option<tokio::task::JoinHandle<anyhow::Result<Written>>>,
    /// (bulk load, rollups, index build) seconds, once the bulk load is done.
    bulk_took: (f64, f64, f64),
    records: u64,
    projected: u64,
    dead_lettered: u64,
}

/// Rebuilds `only` (or every tenant) from offset 0; `on_progress` is called every
/// `progress_every` while it runs.
pub async fn replay(
    config: &Config,
    pool: &PgPool,
    only: Option<TenantId>,
    progress_every: Duration,
    on_progress: &mut dyn FnMut(&Progress),
) -> anyhow::Result<Report> {
    let started = Instant::now();
    // One replay at a time (a session lock: released when this connection goes).
    let mut lock = pool.acquire().await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('tally.replay'))")
        .fetch_one(&mut *lock)
        .await?;
    ensure!(got, "another replay is running");
    // Beside this one, a bulk batch writes on two connections and the rollups are folded on
    // three.
    ensure!(
        pool.options().get_max_connections() >= 4,
        "a replay needs at least 4 database connections (TALLY_DB_MAX_CONNECTIONS)"
    );

    let tenants: Vec<TenantId> = match only {
        Some(t) => {
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM control.tenants WHERE id = $1)")
                    .bind(t.0)
                    .fetch_one(pool)
                    .await?;
            ensure!(exists, "no tenant {t}");
            vec![t]
        }
        None => sqlx::query_scalar("SELECT id FROM control.tenants ORDER BY id")
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(TenantId)
            .collect(),
    };
    ensure!(!tenants.is_empty(), "there are no tenants to replay");
    let (current, target) = prepare_versions(pool, &tenants).await?;

    let topics = [config.common.metrics_topic(), config.common.auth_topic()];
    let consumer: StreamConsumer = shared::kafka::client_config(&config.common)
        .set("group.id", format!("tally-replay-{}", uuid::Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50")
        .set("max.partition.fetch.bytes", "4194304")
        .set("queued.max.messages.kbytes", "16384")
        .set(
            "fetch.queue.backoff.ms",
            crate::consumer::FETCH_QUEUE_BACKOFF_MS,
        )
        .create()?;
    let mut partitions = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for (i, topic) in topics.iter().enumerate() {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("reading the metadata of {topic}"))?;
        for t in md.topics() {
            for p in t.partitions() {
                partitions.push((i, p.id()));
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
            }
        }
    }
    consumer.assign(&tpl)?;
    // The log end now: everything before it is bulk-loaded.
    let mut until = HashMap::new();
    for &(i, p) in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(&topics[i], p, Duration::from_secs(10))
            .with_context(|| format!("reading the end of {}[{p}]", topics[i]))?;
        if high > low {
            until.insert((i, p), high);
        }
    }

    let writer = Writer {
        pool: pool.clone(),
        dlq: shared::kafka::producer(&config.common, Duration::from_secs(30))?,
        dlq_topics: [
            config.common.metrics_dlq_topic(),
            config.common.auth_dlq_topic(),
        ],
        topics,
        target: target.clone(),
        partitions_ahead_days: config.partitions_ahead_days,
        projection: config.projection.clone(),
    };
    let mut r = Replayer {
        config,
        pool,
        consumer,
        tenants: tenants.iter().copied().collect(),
        writer: Arc::new(writer),
        prepared: Prepared::default(),
        partitions,
        read: HashMap::new(),
        written: HashMap::new(),
        batch: Vec::new(),
        batch_bytes: 0,
        poison: Vec::new(),
        redis: shared::redis_client::connect(&config.common.redis_url).await,
        bulk: (config.replay_bulk && !until.is_empty()).then(|| Bulk {
            until,
            days: BTreeMap::new(),
            indexes: BTreeMap::new(),
            dropped: HashSet::new(),
            started: Instant::now(),
        }),
        in_flight: None,
        bulk_took: (0.0, 0.0, 0.0),
        records: 0,
        projected: 0,
        dead_lettered: 0,
    };
    let switch_ms = r.run(&current, progress_every, on_progress).await?;
    let seconds = started.elapsed().as_secs_f64();

    // Tell query-api (caches, live feeds) that these tenants moved.
    if let Some(redis) = r.redis.as_mut() {
        shared::watermark::publish(redis, tenants.iter().map(|t| (*t, 0))).await;
    }
    // The deltas the catch-up appended, folded now rather than when live traffic next
    // writes these versions (the live projector's compactor folds what comes after).
    for t in &tenants {
        let schema = t.schema(target[t]);
        // Busy (retention, the live compactor) is brief: asked again, a few times.
        for _ in 0..50 {
            match rollups::compact(pool, &schema).await {
                Ok(Some(_)) => break,
                Ok(None) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => {
                    tracing::warn!(tenant = %t, error = %e, "replay: folding the catch-up's deltas failed");
                    break;
                }
            }
        }
    }
    // Requests that read the old version number just before the switch finish first.
    tokio::time::sleep(Duration::from_secs(config.replay_drop_grace_secs)).await;
    let mut conn = pool.acquire().await?;
    for t in &tenants {
        schema::drop_tenant_schema(&mut conn, *t, current[t]).await?;
    }
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtext('tally.replay'))")
        .execute(&mut *lock)
        .await;
    Ok(Report {
        tenants: tenants.len(),
        records: r.records,
        projected: r.projected,
        seconds,
        records_per_sec: r.records as f64 / seconds.max(1e-9),
        switch_ms,
        bulk_secs: r.bulk_took.0,
        rollup_secs: r.bulk_took.1,
        index_secs: r.bulk_took.2,
        dead_lettered: r.dead_lettered,
        versions: tenants
            .iter()
            .map(|t| (*t, current[t], target[t]))
            .collect(),
    })
}

/// Each tenant's current and new version. Makes the `tenant_versions` rows exist (so live
/// batches lock them from now on), drops what a failed replay left (a version it never
/// switched to, or an old one it switched from but never dropped), and creates the new
/// schemas of tenants that have a projection.
async fn prepare_versions(
    pool: &PgPool,
    tenants: &[TenantId],
) -> anyhow::Result<(Versions, Versions)> {
    let mut conn = pool.acquire().await?;
    let current = schema::active_versions(&mut conn, tenants, Lock::None).await?;
    sqlx::query(
        "INSERT INTO control.tenant_versions (tenant_id, active_version)
         SELECT * FROM UNNEST($1::uuid[], $2::int[]) ON CONFLICT DO NOTHING",
    )
    .bind(tenants.iter().map(|t| t.0).collect::<Vec<_>>())
    .bind(tenants.iter().map(|t| current[t]).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    let mut target = Versions::new();
    for t in tenants {
        let v = current[t];
        let leftovers: Vec<i32> = sqlx::query_scalar(
            "SELECT version FROM control.tenant_schemas WHERE tenant_id = $1 AND version <> $2",
        )
        .bind(t.0)
        .bind(v)
        .fetch_all(&mut *conn)
        .await?;
        for old in leftovers {
            schema::drop_tenant_schema(&mut conn, *t, old).await?;
        }
        let has_projection: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM control.tenant_schemas WHERE tenant_id = $1 AND version = $2)",
        )
        .bind(t.0)
        .bind(v)
        .fetch_one(&mut *conn)
        .await?;
        if has_projection {
            schema::create_tenant_schema(&mut conn, *t, v + 1).await?;
        }
        target.insert(*t, v + 1);
    }
    Ok((current, target))
}

impl Replayer<'_> {
    /// Reads, writes and finally switches. Returns how long the switch held live batches.
    async fn run(
        &mut self,
        current: &Versions,
        progress_every: Duration,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> anyhow::Result<f64> {
        let started = Instant::now();
        let linger = Duration::from_millis(self.config.batch_linger_ms);
        let mut batch_started: Option<Instant> = None;
        let mut last_progress = Instant::now();
        let mut switching: Option<Switching> = None;
        // The clock is read once a record, as it arrives: the next wait's deadline and every
        // "how long since" below take that reading (the clock costs more than a record's
        // bookkeeping here). A deadline already past ends a wait only if no record is ready.
        let mut now = Instant::now();
        loop {
            let wait = tokio::time::Instant::from_std(now) + Duration::from_millis(100);
            let received = tokio::time::timeout_at(wait, self.consumer.recv()).await;
            now = Instant::now();
            match received {
                Ok(Ok(m)) => {
                    let Some(i) = self.writer.topics.iter().position(|t| t == m.topic()) else {
                        continue;
                    };
                    self.records += 1;
                    self.read.insert((i, m.partition()), m.offset() + 1);
                    // A record is decoded whole unless `may_belong_to` finds, from its
                    // envelope's first top-level `tenant_id`, that it is another tenant's.
                    // Records without a readable envelope name no tenant (the live projector
                    // dead-lettered them); a replayed tenant's record that today's rules
                    // refuse was projected in the old version, so it goes to the DLQ, not
                    // away.
                    let env = if may_belong_to(&self.tenants, m.key(), m.payload()) {
                        crate::consumer::decode_envelope(m.payload())
                            .ok()
                            .filter(|env| self.tenants.contains(&env.tenant_id))
                    } else {
                        None
                    };
                    match env.map(crate::consumer::decode_payload) {
                        Some(Ok(mut d)) => {
                            d.origin = (m.partition(), m.offset());
                            self.batch_bytes += m.payload_len();
                            self.batch.push(d);
                        }
                        Some(Err(error)) => {
                            self.poison.push((i, crate::consumer::poison(&m, error)));
                        }
                        None => {}
                    }
                    batch_started.get_or_insert(now);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    now = Instant::now();
                }
                Err(_idle) => {}
            }
            let batches = if self.bulk.is_some() { BULK_BATCHES } else { 1 };
            let full = self.batch.len() >= self.config.batch_max_events * batches
                || self.batch_bytes >= self.config.batch_max_bytes * batches;
            // A bulk load reads as fast as it can: its batches wait for more to fill up.
            let linger = if self.bulk.is_some() {
                linger * BULK_BATCHES as u32
            } else {
                linger
            };
            let due = batch_started.is_some_and(|t| now.saturating_duration_since(t) >= linger);
            if full || due {
                self.flush().await?;
                batch_started = None;
            } else if self.in_flight.as_ref().is_some_and(|t| t.is_finished()) {
                self.collect().await?;
            }
            if now.saturating_duration_since(last_progress) >= progress_every {
                last_progress = now;
                let lag = self.lag();
                let secs = started.elapsed().as_secs_f64();
                let rate = self.records as f64 / secs.max(1e-9);
                on_progress(&Progress {
                    phase: if self.bulk.is_some() {
                        "bulk loading"
                    } else if switching.is_some() {
                        "switching"
                    } else {
                        "rebuilding"
                    },
                    records: self.records,
                    projected: self.projected,
                    rate,
                    lag,
                    eta_secs: (rate > 0.0).then(|| lag as f64 / rate),
                });
                if switching.is_none()
                    && self.bulk.is_none()
                    && lag <= self.config.batch_max_events as i64
                {
                    switching = Some(self.begin_switch(current).await?);
                }
            }
            if let Some(s) = switching.take() {
                if self.caught_up(&s.live) {
                    let held = s.started.elapsed().as_secs_f64() * 1000.0;
                    self.finish_switch(s.tx).await?;
                    let secs = started.elapsed().as_secs_f64();
                    on_progress(&Progress {
                        phase: "switched",
                        records: self.records,
                        projected: self.projected,
                        rate: self.records as f64 / secs.max(1e-9),
                        lag: 0,
                        eta_secs: Some(0.0),
                    });
                    return Ok(held);
                }
                if s.started.elapsed() > Duration::from_secs(20) {
                    // The live projection ran ahead faster than we caught up: let it go
                    // on, and try again later.
                    tracing::warn!("replay did not catch up within 20 s of locking; retrying");
                    s.tx.rollback().await?;
                } else {
                    switching = Some(s);
                }
            }
        }
    }

    /// Writes the batch in hand to the new versions, or during the bulk load starts writing
    /// it in a task of its own while the next one is read (one write at a time: the one
    /// before is waited for first).
    async fn flush(&mut self) -> anyhow::Result<()> {
        // The batch is written, or the replay fails, below.
        self.batch_bytes = 0;
        self.collect().await?;
        for (i, p) in std::mem::take(&mut self.poison) {
            self.writer.dead_letter(i, p).await;
            self.dead_lettered += 1;
        }
        // Only other tenants' records were read: nothing to write, they are just passed.
        if self.batch.is_empty() {
            self.written.extend(self.read.iter().map(|(k, v)| (*k, *v)));
            return self.bulk_step().await;
        }
        let writer = Arc::clone(&self.writer);
        let Some(bulk) = self.bulk.as_mut() else {
            let (projected, dead) = writer
                .write(&mut self.prepared, &mut self.batch, false)
                .await?;
            self.projected += projected;
            self.dead_lettered += dead;
            self.batch.clear();
            self.written.extend(self.read.iter().map(|(k, v)| (*k, *v)));
            return Ok(());
        };
        let mut backoff = Duration::from_millis(200);
        while let Err(e) = ready_for_bulk(self.pool, bulk, &self.writer.target, &self.batch).await {
            if permanent(&e) {
                return Err(anyhow::Error::new(e).context("replay: preparing a bulk load"));
            }
            tracing::warn!(error = %e, "replay: preparing a bulk load failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        for d in &self.batch {
            let day = Grain::Day.bucket(d.env.occurred_at);
            bulk.days.entry(d.env.tenant_id).or_default().insert(day);
        }
        let mut batch = std::mem::take(&mut self.batch);
        let mut prepared = std::mem::take(&mut self.prepared);
        let read = self.read.clone();
        self.in_flight = Some(tokio::spawn(async move {
            let (projected, dead) = writer.write(&mut prepared, &mut batch, true).await?;
            Ok(Written {
                projected,
                dead_lettered: dead,
                read,
                prepared,
            })
        }));
        Ok(())
    }

    /// Waits for the bulk-load write in flight, if any, and takes its result.
    async fn collect(&mut self) -> anyhow::Result<()> {
        let Some(task) = self.in_flight.take() else {
            return Ok(());
        };
        let done = task.await.context("a bulk-load write panicked")??;
        self.projected += done.projected;
        self.dead_lettered += done.dead_lettered;
        self.prepared = done.prepared;
        self.written.extend(done.read);
        self.bulk_step().await
    }

    /// After a bulk-load batch: once the whole bulk is loaded, folds the rollups from the
    /// raw rows and builds the dropped indexes.
    async fn bulk_step(&mut self) -> anyhow::Result<()> {
        let Some(bulk) = self.bulk.as_mut() else {
            return Ok(());
        };
        let done = bulk
            .until
            .iter()
            .all(|(tp, end)| self.written.get(tp).is_some_and(|w| w >= end));
        if !done {
            return Ok(());
        }
        let loaded = bulk.started.elapsed();
        let folding = Instant::now();
        for (tenant, days) in &bulk.days {
            let schema = tenant.schema(self.writer.target[tenant]);
            let keys = retry("reading the rollups' keys", || async {
                rollups::primary_keys(&mut *self.pool.acquire().await?, &schema).await
            })
            .await?;
            // The usage is placed and rolled up on a connection of its own meanwhile.
            let (rows, ()) = tokio::try_join!(
                retry("folding the rollups", || {
                    rollups::rebuild(self.pool, &schema, days, &keys)
                }),
                retry("placing the usage and folding its rollups", || async {
                    let mut tx = self.pool.begin().await?;
                    schema::set_search_path(&mut tx, &schema).await?;
                    attribution::rebuild(&mut tx).await?;
                    tx.commit().await
                })
            )?;
            tracing::info!(%tenant, days = days.len(), rows, "rollups folded");
        }
        let folded = folding.elapsed().as_secs_f64();
        let indexing = Instant::now();
        for (tenant, definitions) in &bulk.indexes {
            let schema = tenant.schema(self.writer.target[tenant]);
            retry("building indexes", || {
                schema::create_indexes(self.pool, &schema, definitions)
            })
            .await?;
            retry("turning autovacuum back on", || async {
                schema::set_autovacuum(&mut *self.pool.acquire().await?, &schema, true).await
            })
            .await?;
        }
        self.bulk_took = (
            bulk.started.elapsed().as_secs_f64(),
            folded,
            indexing.elapsed().as_secs_f64(),
        );
        tracing::info!(
            records = self.records,
            loaded_secs = loaded.as_secs_f64(),
            rollup_secs = folded,
            indexed_secs = self.bulk_took.2,
            "bulk load done; catching up"
        );
        self.bulk = None;
        Ok(())
    }

    /// Records between what is written and the log end, over every partition.
    fn lag(&self) -> i64 {
        self.partitions
            .iter()
            .map(|&(i, p)| {
                let (low, high) = self
                    .consumer
                    .fetch_watermarks(&self.writer.topics[i], p, Duration::from_secs(2))
                    .unwrap_or((0, 0));
                (high - self.written.get(&(i, p)).copied().unwrap_or(low)).max(0)
            })
            .sum()
    }

    /// Locks the replayed tenants' version rows (live batches for them now wait) and reads
    /// how far the live projection got.
    async fn begin_switch(&self, current: &Versions) -> anyhow::Result<Switching> {
        let mut tx = self.pool.begin().await?;
        let tenants: Vec<TenantId> = self.tenants.iter().copied().collect();
        let now = schema::active_versions(&mut tx, &tenants, Lock::Update).await?;
        let started = Instant::now();
        for (t, v) in now {
            ensure!(
                current.get(&t) == Some(&v),
                "tenant {t} was switched to version {v} by someone else during this replay"
            );
        }
        let offsets: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT topic, partition, next_offset FROM control.projector_offsets
              WHERE projection = $1 AND topic = ANY($2)",
        )
        .bind(&self.config.projection)
        .bind(self.writer.topics.to_vec())
        .fetch_all(&mut *tx)
        .await?;
        let live = offsets
            .into_iter()
            .filter_map(|(topic, p, o)| {
                let i = self.writer.topics.iter().position(|t| *t == topic)?;
                Some(((i, p), o))
            })
            .collect();
        Ok(Switching { tx, live, started })
    }

    fn caught_up(&self, live: &HashMap<Tp, i64>) -> bool {
        live.iter()
            .all(|(tp, o)| self.written.get(tp).copied().unwrap_or(0) >= *o)
    }

    async fn finish_switch(&self, mut tx: Transaction<'static, Postgres>) -> anyhow::Result<()> {
        let (ids, versions): (Vec<uuid::Uuid>, Vec<i32>) =
            self.writer.target.iter().map(|(t, v)| (t.0, *v)).unzip();
        sqlx::query(
            "UPDATE control.tenant_versions v
                SET active_version = x.version, switched_at = now()
               FROM UNNEST($1::uuid[], $2::int[]) AS x(tenant_id, version)
              WHERE v.tenant_id = x.tenant_id",
        )
        .bind(ids)
        .bind(versions)
        .execute(&mut *tx)
        .await?;
        // Cache lookups keyed by the old version's announced watermark stop finding answers
        // before the switch commits (see `shared::watermark`).
        if let Some(mut redis) = self.redis.clone() {
            let mut announced = Vec::with_capacity(self.writer.target.len());
            for (tenant, version) in &self.writer.target {
                let schema = tenant.schema(*version);
                let seq: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT seq FROM {schema}.projection_state"
                )))
                .fetch_one(&mut *tx)
                .await?;
                announced.push((*tenant, *version, seq));
            }
            let raise = shared::watermark::raise(&mut redis, &announced);
            if !matches!(
                tokio::time::timeout(Duration::from_secs(1), raise).await,
                Ok(Ok(()))
            ) {
                tracing::warn!("announcing the new versions' watermarks failed");
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

/// What writing a batch to the new versions needs, owned: a bulk-load batch is written by a
/// task of its own.
struct Writer {
    pool: PgPool,
    dlq: FutureProducer,
    /// The metrics and auth topics, and their dead-letter topics.
    topics: [String; 2],
    dlq_topics: [String; 2],
    target: Versions,
    partitions_ahead_days: i64,
    projection: String,
}

/// What a bulk-load write did: events projected, records dead-lettered, the read offsets it
/// covered, and the schema cache it used.
struct Written {
    projected: u64,
    dead_lettered: u64,
    read: HashMap<Tp, i64>,
    prepared: Prepared,
}

impl Writer {
    /// Sends a record of `topics[topic]` that cannot be projected to that topic's DLQ.
    async fn dead_letter(&self, topic: usize, p: Poison) {
        let (from, to) = (&self.topics[topic], &self.dlq_topics[topic]);
        crate::consumer::dead_letter(&self.dlq, from, to, &[p]).await;
    }

    /// Writes `batch` (retrying while PostgreSQL is away; records it refuses for their own
    /// sake are taken out of the batch and dead-lettered): (events projected, records
    /// dead-lettered).
    async fn write(
        &self,
        prepared: &mut Prepared,
        batch: &mut Vec<Decoded>,
        bulk: bool,
    ) -> anyhow::Result<(u64, u64)> {
        let mut dead = 0;
        let mut backoff = Duration::from_millis(200);
        loop {
            let attempt = async {
                prepare::prepare(
                    &self.pool,
                    prepared,
                    &self.target,
                    self.partitions_ahead_days,
                    batch,
                    bulk,
                )
                .await?;
                let mode = if bulk {
                    Mode::Bulk
                } else {
                    Mode::Live(None, batch::Pipeline::default())
                };
                batch::write(
                    &self.pool,
                    &self.projection,
                    "",
                    Target::Fixed(&self.target),
                    batch,
                    &BTreeMap::new(),
                    mode,
                )
                .await
            };
            match attempt.await {
                Ok(w) => return Ok((w.inserted, dead)),
                Err(WriteError::Db(e)) if batch::refused_record(&e).is_some() => {
                    let refused =
                        batch::find_refused(&self.pool, Target::Fixed(&self.target), batch).await;
                    match refused {
                        Ok(found) if !found.is_empty() => {
                            for (i, reason) in found.iter().rev() {
                                let d = batch.remove(*i);
                                let topic = usize::from(!d.env.event_type.is_metric());
                                self.dead_letter(topic, Poison::refused(&d, reason.clone()))
                                    .await;
                                dead += 1;
                            }
                        }
                        _ => {
                            tracing::warn!(error = %e, "replay batch failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
                Err(WriteError::Db(e)) => {
                    tracing::warn!(error = %e, "replay batch failed; retrying");
                    prepared.clear();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Readies the new schemas a bulk batch writes to for the first time for the load: makes
/// them if they are not there yet (a tenant without a projection before the replay), drops
/// their secondary indexes and turns their autovacuum off.
async fn ready_for_bulk(
    pool: &PgPool,
    bulk: &mut Bulk,
    target: &Versions,
    batch: &[Decoded],
) -> sqlx::Result<()> {
    for d in batch {
        let tenant = d.env.tenant_id;
        if bulk.dropped.contains(&tenant) {
            continue;
        }
        let mut conn = pool.acquire().await?;
        schema::create_tenant_schema(&mut conn, tenant, target[&tenant]).await?;
        let schema = tenant.schema(target[&tenant]);
        let dropped = bulk.indexes.entry(tenant).or_default();
        schema::drop_secondary_indexes(&mut conn, &schema, dropped).await?;
        schema::set_autovacuum(&mut conn, &schema, false).await?;
        bulk.dropped.insert(tenant);
    }
    Ok(())
}

/// Whether PostgreSQL refused a statement in a way no retry can change (see [`retry`]).
fn permanent(e: &sqlx::Error) -> bool {
    let code = e.as_database_error().and_then(|d| d.code());
    let classes = ["42", "0A", "22", "23"];
    code.is_some_and(|c| classes.iter().any(|class| c.starts_with(class)))
}

/// Runs `attempt` until it succeeds, backing off while PostgreSQL is away (a rebuild has
/// nothing better to do; if it is stopped, the next one starts over). A statement
/// PostgreSQL cannot run at all (SQLSTATE class 42 or 0A: this build and the database
/// disagree) or refuses for what it was given (22: data, 23: a constraint) ends the replay
/// instead: no retry can change it.
async fn retry<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = sqlx::Result<T>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        let e = match attempt().await {
            Ok(done) => return Ok(done),
            Err(e) => e,
        };
        if permanent(&e) {
            return Err(anyhow::Error::new(e).context(format!("replay: {what}")));
        }
        tracing::warn!(error = %e, "replay: {what} failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
