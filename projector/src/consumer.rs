//! The consume loop: decode → batch → write (with offsets) → acknowledge, as explicit stages.
//! While a batch is in PostgreSQL's hands, the records after it are received and decoded into
//! the next batch. Once the first batch's raw rows are written, the next one starts writing
//! its own, ahead, and commits only after the first has landed ([`batch::Pipeline`]): two
//! batches in flight, in two transactions that commit in order.
//!
//! Offsets live in PostgreSQL with the rows. On assignment the loop learns each partition's
//! stored offset; a record below it was already projected and is skipped, a record above it
//! means a gap and the partition is sought back ([`crate::offsets::resume`]). Kafka's own
//! commit is only for lag display.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use redis::aio::ConnectionManager;
use shared::events::Envelope;
use shared::health::ShutdownFlag;
use shared::tenant::TenantId;
use sqlx::PgPool;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::batch::{self, AheadOf, Decoded, Pipeline, Seqs, WriteError, Written};
use crate::config::Config;
use crate::offsets::{self, OffsetRange, Resume, Stalls};
use crate::prepare::{self, Prepared, Target};

/// Partition changes seen by the rebalance callback, handled by the loop after `recv`.
/// The callback only records them: it must never block or await.
#[derive(Default)]
pub struct RebalanceLog(Mutex<Vec<i32>>);

pub struct ProjectorContext {
    log: Arc<RebalanceLog>,
}

impl ClientContext for ProjectorContext {}

impl ConsumerContext for ProjectorContext {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        let parts: Vec<i32> = match rebalance {
            Rebalance::Assign(tpl) | Rebalance::Revoke(tpl) => {
                tpl.elements().iter().map(|e| e.partition()).collect()
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                Vec::new()
            }
        };
        tracing::info!(
            ?parts,
            kind = match rebalance {
                Rebalance::Assign(_) => "assign",
                Rebalance::Revoke(_) => "revoke",
                Rebalance::Error(_) => "error",
            },
            "rebalance"
        );
        self.log.0.lock().expect("rebalance log").extend(parts);
    }
}

/// A batch being filled.
#[derive(Default)]
struct Pending {
    events: Vec<Decoded>,
    poison: Vec<Poison>,
    offsets: BTreeMap<i32, OffsetRange>,
    /// The bytes of its records as Kafka held them.
    bytes: usize,
    /// Since when its first record has waited: since it was produced (its Kafka timestamp),
    /// at most a linger before it got here ([`waiting_since`]).
    started: Option<Instant>,
}

impl Pending {
    fn len(&self) -> usize {
        self.events.len() + self.poison.len()
    }

    /// Whether it holds as many records, or as many bytes, as a batch may.
    fn full(&self, config: &Config) -> bool {
        self.len() >= config.batch_max_events || self.bytes >= config.batch_max_bytes
    }
}

/// A record that cannot be projected, on its way to the dead-letter topic.
pub(crate) struct Poison {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub partition: i32,
    pub offset: i64,
    pub error: String,
}

impl Poison {
    /// A decoded event the database refused, with the reason.
    pub(crate) fn refused(d: &Decoded, error: String) -> Poison {
        Poison {
            key: Some(d.env.kafka_key().into_bytes()),
            payload: Some(serde_json::to_vec(&d.env).expect("an envelope serializes")),
            partition: d.origin.0,
            offset: d.origin.1,
            error,
        }
    }
}

/// Sends poison records of `topic` to `dlq_topic`, with where they came from and why in the
/// headers, retrying each until Kafka has it.
pub(crate) async fn dead_letter(
    dlq: &FutureProducer,
    topic: &str,
    dlq_topic: &str,
    poison: &[Poison],
) {
    for p in poison {
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "tally-source-topic",
                    value: Some(topic.as_bytes()),
                })
                .insert(Header {
                    key: "tally-source-partition",
                    value: Some(p.partition.to_string().as_bytes()),
                })
                .insert(Header {
                    key: "tally-source-offset",
                    value: Some(p.offset.to_string().as_bytes()),
                })
                .insert(Header {
                    key: "tally-error",
                    value: Some(p.error.as_bytes()),
                });
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(dlq_topic).headers(headers);
            if let Some(k) = &p.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &p.payload {
                rec = rec.payload(v.as_slice());
            }
            match dlq.send(rec, Duration::from_secs(5)).await {
                Ok(_) => {
                    metrics::counter!("projector_dlq_total").increment(1);
                    tracing::warn!(partition = p.partition, offset = p.offset, error = %p.error, "record dead-lettered");
                    break;
                }
                Err((e, _)) => {
                    tracing::warn!(error = %e, "DLQ produce failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// How long librdkafka waits before fetching a partition again once its prefetch queue was
/// over its bound (`fetch.queue.backoff.ms`; 1000 by default). The queue is kept small
/// (`queued.max.messages.kbytes`, a fraction of a second of heavy traffic), so a drain
/// empties it well within that second: with the default, the consume loop then had nothing
/// to read for up to a second at a time, with PostgreSQL idle meanwhile. Draining 200 000
/// queued events, three rounds a shape: 25 977-26 620 events/s (live) and 23 546-26 095
/// (backfill) with the default, 46 200-62 226 and 33 930-39 729 with this
/// (tests/PERFORMANCE.md, twenty-fourth session). The cost: librdkafka checks the queue
/// again every 10 ms while it stays full.
pub(crate) const FETCH_QUEUE_BACKOFF_MS: &str = "10";

pub struct Projector {
    pub config: Config,
    pub pool: PgPool,
    pub redis: Option<ConnectionManager>,
    pub consumer: Arc<StreamConsumer<ProjectorContext>>,
    pub dlq: FutureProducer,
    log: Arc<RebalanceLog>,
    topic: String,
    dlq_topic: String,
    /// The next offset to project, per partition: the stored one (0 when none is stored),
    /// then advanced by the loop as records are accepted.
    positions: HashMap<i32, i64>,
    /// Tenants known to exist (events of unknown ones are poison), so each record does not ask.
    known: HashSet<TenantId>,
    prepared: Prepared,
    stalls: Stalls,
    /// Told which tenants advanced after each batch (the metrics loop, where alerting runs).
    pub alerts: Option<crate::alerts::Touched>,
    /// Told which schemas got rollup deltas after each batch (the metrics loop).
    pub dirty: Option<crate::compactor::Dirty>,
    /// The batch written ahead of the one in flight, if any: written next.
    ahead: Option<InFlight>,
}

/// A batch's write attempt under way in a task of its own; gives back its outcome, the
/// caches it filled, and the batch.
struct InFlight {
    task: JoinHandle<(Result<Written, WriteError>, Prepared, Pending)>,
    /// Its feed positions once its raw rows are written (the next batch may start then),
    /// with the caches as its attempt filled them (the next batch is prepared from them).
    raw_written: Option<oneshot::Receiver<(Seqs, Prepared)>>,
    /// For a batch written ahead: to tell it whether the batch before it landed.
    landed: Option<oneshot::Sender<bool>>,
    /// For a batch written ahead: its poison records, dead-lettered before it may commit.
    poison: Vec<Poison>,
    since: Instant,
}

impl Projector {
    /// A consume loop for one topic (the metrics and the auth topic each have their own, with
    /// their own consumer group and stored offsets).
    pub fn new(
        config: Config,
        pool: PgPool,
        redis: Option<ConnectionManager>,
        topic: String,
        dlq_topic: String,
        group: String,
        stalls: Stalls,
    ) -> anyhow::Result<Projector> {
        let log = Arc::new(RebalanceLog::default());
        let consumer: StreamConsumer<ProjectorContext> =
            shared::kafka::client_config(&config.common)
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                .set(
                    "session.timeout.ms",
                    config.consumer_session_timeout_ms.to_string(),
                )
                .set("heartbeat.interval.ms", "1000")
                .set("fetch.wait.max.ms", "50")
                // A fetch's answer is compressed (lz4: about 100 bytes an event, five times
                // less than decoded), and librdkafka only stops fetching once its queue is
                // over the bound below: with 4 MB a partition and librdkafka's 50 MB an
                // answer, one answer over six partitions decoded to about 100 MB, and a
                // drained backlog peaked at 143 MB resident. 1 MB an answer is about
                // 10 000 events, more than a batch.
                .set("fetch.max.bytes", "1048576")
                .set("max.partition.fetch.bytes", "1048576")
                // Prefetch a fraction of a second of heavy traffic, not librdkafka's 64 MB:
                // the projector's memory stays small whatever the backlog.
                .set(
                    "queued.max.messages.kbytes",
                    config.consumer_queue_kbytes.to_string(),
                )
                .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
                .create_with_context(ProjectorContext { log: log.clone() })?;
        consumer.subscribe(&[&topic])?;
        let dlq = shared::kafka::producer(&config.common, Duration::from_secs(30))?;
        Ok(Projector {
            dlq_topic,
            topic,
            config,
            pool,
            redis,
            consumer: Arc::new(consumer),
            dlq,
            log,
            positions: HashMap::new(),
            known: HashSet::new(),
            prepared: Prepared::default(),
            stalls,
            alerts: None,
            dirty: None,
            ahead: None,
        })
    }

    /// Runs until `stop` flips; finishes and commits the batch in hand before returning.
    pub async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
        shutdown: ShutdownFlag,
    ) -> anyhow::Result<()> {
        let linger = Duration::from_millis(self.config.batch_linger_ms);
        let mut pending = Pending::default();
        // A record borrows its consumer; borrow a handle of our own so `self` stays free.
        let consumer = self.consumer.clone();
        loop {
            if self.ahead.is_some() {
                // The batch written ahead goes next, at once; after a stop, nothing is
                // written ahead of it.
                let overlap = !*stop.borrow();
                self.flush(&mut pending, overlap).await;
                continue;
            }
            let wait = match pending.started {
                Some(t) => linger.saturating_sub(t.elapsed()),
                None => Duration::from_millis(500),
            };
            tokio::select! {
                biased;
                _ = stop.changed() => {
                    shutdown.trigger();
                    break;
                }
                // A batch filled while the one before it was written goes at once.
                _ = std::future::ready(()), if pending.full(&self.config) => {}
                msg = tokio::time::timeout(wait, consumer.recv()) => {
                    self.apply_rebalances(&mut pending);
                    match msg {
                        Ok(Ok(m)) => self.accept(&m, &mut pending).await,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "kafka consume error");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(_elapsed) => {}
                    }
                }
            }
            let due = pending.started.is_some_and(|t| t.elapsed() >= linger);
            if due {
                // What librdkafka already holds waited as long: take it along.
                self.take_ready(&mut pending).await;
            }
            if due || pending.full(&self.config) {
                self.flush(&mut pending, true).await;
            }
        }
        if pending.len() > 0 {
            // The last batch: nothing after it is read.
            self.flush(&mut pending, false).await;
        }
        Ok(())
    }

    /// Accepts the records already fetched, without waiting for more, until the batch is full
    /// (or as many were polled: records already projected are skipped, not batched). Best
    /// effort: what is left goes in the next batch.
    async fn take_ready(&mut self, pending: &mut Pending) {
        let consumer = self.consumer.clone();
        for _ in 0..self.config.batch_max_events {
            if pending.full(&self.config) {
                break;
            }
            // A zero timeout still polls the receive once: a fetched record is returned.
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(m)) => {
                    self.apply_rebalances(pending);
                    self.accept(&m, pending).await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consume error");
                    break;
                }
                Err(_nothing_fetched) => break,
            }
        }
    }

    /// Partitions that were assigned or revoked: forget what we knew about them; the next
    /// record of each reloads its position from the database.
    fn apply_rebalances(&mut self, pending: &mut Pending) {
        let changed: Vec<i32> = std::mem::take(&mut *self.log.0.lock().expect("rebalance log"));
        for p in changed {
            self.positions.remove(&p);
            if pending.offsets.contains_key(&p) {
                // The batch in hand still covers it; its compare-and-set decides whether
                // it may land, so keep it.
                tracing::debug!(partition = p, "partition changed hands mid-batch");
            }
        }
    }

    /// This topic's stored offsets, waiting for PostgreSQL as long as it takes.
    async fn stored_offsets(&self) -> HashMap<i32, i64> {
        loop {
            match offsets::stored(&self.pool, &self.config.projection, &self.topic).await {
                Ok(s) => return s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read stored offsets; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn position(&mut self, partition: i32) -> i64 {
        if let Some(p) = self.positions.get(&partition) {
            return *p;
        }
        let next = offsets::next_offset(self.stored_offsets().await.get(&partition).copied());
        self.positions.insert(partition, next);
        next
    }

    /// The first offset still in the partition's log (retention deletes older records).
    fn log_start(&self, partition: i32) -> Option<i64> {
        match self
            .consumer
            .fetch_watermarks(&self.topic, partition, Duration::from_secs(5))
        {
            Ok((low, _high)) => Some(low),
            Err(e) => {
                tracing::warn!(error = %e, partition, "cannot read the log start");
                None
            }
        }
    }

    async fn accept(&mut self, m: &BorrowedMessage<'_>, pending: &mut Pending) {
        let (partition, offset) = (m.partition(), m.offset());
        let next = self.position(partition).await;
        // Where the batch's compare-and-set expects the stored offset to stand.
        let from = match offsets::resume(next, offset, || self.log_start(partition)) {
            Resume::Skip => return, // already projected
            Resume::Take { from, expired: 0 } => from,
            Resume::Take { from, expired } => {
                // Retention deleted them before they were projected: nothing can bring them
                // back, so go on from the log's first record, loudly.
                tracing::error!(
                    partition,
                    next,
                    log_start = offset,
                    lost = expired,
                    "records expired from the log before they were projected"
                );
                metrics::counter!("projector_records_expired_total", "topic" => self.topic.clone())
                    .increment(expired as u64);
                from
            }
            Resume::SeekBack => {
                tracing::warn!(
                    partition,
                    offset,
                    next,
                    "gap before stored offset; seeking back"
                );
                self.seek(partition, Offset::Offset(next));
                return;
            }
        };
        self.positions.insert(partition, offset + 1);
        pending
            .offsets
            .entry(partition)
            .and_modify(|r| r.end = offset + 1)
            .or_insert(OffsetRange {
                start: from,
                end: offset + 1,
            });
        pending.bytes += m.payload_len();
        let linger = Duration::from_millis(self.config.batch_linger_ms);
        pending
            .started
            .get_or_insert_with(|| waiting_since(m.timestamp().to_millis(), linger));

        match decode(m.payload()) {
            Ok(mut d) => {
                d.origin = (partition, offset);
                let known = loop {
                    match prepare::tenant_known(&self.pool, &mut self.known, d.env.tenant_id).await
                    {
                        Ok(k) => break k,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot check tenant; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                };
                if known {
                    pending.events.push(d);
                } else {
                    pending
                        .poison
                        .push(poison(m, format!("unknown tenant {}", d.env.tenant_id)));
                }
            }
            Err(error) => pending.poison.push(poison(m, error)),
        }
    }

    /// Writes the batch, retrying while PostgreSQL is unavailable; on a fence, drops it and
    /// rewinds to the stored offsets. Events PostgreSQL refuses for their own sake are taken
    /// out of the batch and dead-lettered, and the rest is written.
    ///
    /// `pending` is the next batch, empty on entry: with `overlap`, while the first attempt
    /// is in PostgreSQL's hands, the records after the batch are received and decoded into it
    /// ([`Self::write_overlapped`]). If that attempt does not land, they are dropped and
    /// their partitions sought back to their first record, to be read again once the batch
    /// has landed.
    ///
    /// The batch written ahead during the one before, if there is one, is the batch here: its
    /// first attempt is already under way.
    async fn flush(&mut self, pending: &mut Pending, overlap: bool) {
        let (mut batch, in_flight) = match self.ahead.take() {
            Some(ahead) => (Pending::default(), Some(ahead)),
            None => {
                let batch = std::mem::take(pending);
                if !batch.poison.is_empty() {
                    self.dead_letter(&batch.poison).await;
                }
                match overlap {
                    true => (Pending::default(), Some(self.spawn_attempt(batch, None))),
                    false => (batch, None),
                }
            }
        };
        let started = in_flight.as_ref().map_or_else(Instant::now, |f| f.since);
        let mut backoff = Duration::from_millis(200);
        let mut paused: Option<TopicPartitionList> = None;
        let mut redis = self.redis.clone();
        let mut first = None;
        if let Some(in_flight) = in_flight {
            let (outcome, back) = self.write_overlapped(in_flight, pending, overlap).await;
            batch = back;
            if outcome.is_err() {
                self.drop_next(pending);
            }
            first = Some(outcome);
        }
        let result = loop {
            let outcome = match first.take() {
                Some(outcome) => outcome,
                None => {
                    write_attempt(
                        &self.pool,
                        &mut self.prepared,
                        (&self.config, &self.topic),
                        &batch,
                        redis.as_mut(),
                        (None, None),
                    )
                    .await
                }
            };
            match outcome {
                Err(WriteError::VersionMoved) => {
                    tracing::info!("a replay switched projection versions; preparing again");
                    self.prepared.forget_versions();
                }
                Err(WriteError::Ahead) => {
                    // Written ahead, and gave up waiting: written again now, in turn.
                    ahead_outcome(&self.topic, "timed_out");
                }
                Err(WriteError::Db(e)) => {
                    if batch::refused_record(&e).is_some()
                        && self.set_aside_refused(&mut batch.events).await
                    {
                        // The refused events are in the DLQ; write the rest at once.
                        continue;
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "batch write failed; retrying");
                    metrics::counter!("projector_write_retries_total").increment(1);
                    let parts: Vec<i32> = batch.offsets.keys().copied().collect();
                    self.stalls.set(&self.topic, &parts, &e.to_string());
                    let _ = offsets::note_stall(
                        &self.pool,
                        &self.config.projection,
                        &self.topic,
                        &parts,
                        &e.to_string(),
                    )
                    .await;
                    self.prepared.clear();
                    self.known.clear();
                    if paused.is_none() {
                        paused = self.pause();
                    }
                    // Polling goes on while paused, so the group keeps this member
                    // (max.poll.interval.ms). A record that was already fetched may still
                    // arrive: it is dropped here and read again after the resume.
                    let consumer = self.consumer.clone();
                    let _ = tokio::time::timeout(backoff, consumer.recv()).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                other => break other,
            }
        };
        self.stalls.clear(&self.topic);
        if let Some(tpl) = paused {
            if let Err(e) = self.consumer.resume(&tpl) {
                tracing::warn!(error = %e, "resume failed");
            }
            tracing::info!("batch landed: partitions resumed");
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            self.rewind(&parts).await;
        }
        match result {
            Ok(written) => {
                metrics::counter!("projector_events_total", "outcome" => "inserted")
                    .increment(written.inserted);
                metrics::counter!("projector_events_total", "outcome" => "duplicate")
                    .increment(written.duplicates);
                metrics::histogram!("projector_batch_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("projector_batch_events").record(batch.len() as f64);
                self.acknowledge(&batch.offsets);
                if let Some(dirty) = &self.dirty {
                    dirty.mark(written.schemas);
                }
                self.notify(&written.tenants).await;
            }
            Err(WriteError::Fenced { partition }) => {
                tracing::warn!(partition, "batch fenced by stored offsets; rewinding");
                metrics::counter!("projector_fenced_batches_total").increment(1);
                let parts: Vec<i32> = batch.offsets.keys().copied().collect();
                self.rewind(&parts).await;
            }
            Err(WriteError::Db(_) | WriteError::VersionMoved | WriteError::Ahead) => {
                unreachable!("database errors and version moves are retried above")
            }
            Err(WriteError::HalfWritten(_)) => {
                unreachable!("only a rebuild's bulk load writes on two connections")
            }
        }
    }

    /// Starts a batch's first write attempt in a task of its own. With `before` (the feed
    /// positions of the batch in flight, and a receiver of whether it landed), the batch is
    /// written ahead of it ([`batch::Pipeline`]), unless it needs schemas or partitions made
    /// first: DDL would wait for the batch before anyway, so then it waits until that one
    /// has landed and is written in turn.
    fn spawn_attempt(&self, batch: Pending, before: Option<Seqs>) -> InFlight {
        // The attempt fills a copy of the caches and gives it back.
        let mut prepared = self.prepared.clone();
        let (pool, config, topic) = (self.pool.clone(), self.config.clone(), self.topic.clone());
        let mut redis = self.redis.clone();
        let (raw_tx, raw_rx) = oneshot::channel();
        let (landed_tx, before) = match before {
            Some(seqs) => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some((seqs, rx)))
            }
            None => (None, None),
        };
        let task = tokio::spawn(async move {
            let ahead_of = match before {
                None => None,
                Some((before, landed)) if prepared.ready_for(&batch.events) => {
                    ahead_outcome(&topic, "started");
                    Some(AheadOf { before, landed })
                }
                Some((_, landed)) => {
                    ahead_outcome(&topic, "not_ready");
                    if landed.await != Ok(true) {
                        return (Err(WriteError::Ahead), prepared, batch);
                    }
                    None
                }
            };
            let outcome = write_attempt(
                &pool,
                &mut prepared,
                (&config, &topic),
                &batch,
                redis.as_mut(),
                (ahead_of, Some(raw_tx)),
            )
            .await;
            (outcome, prepared, batch)
        });
        InFlight {
            task,
            raw_written: Some(raw_rx),
            landed: landed_tx,
            poison: Vec::new(),
            since: Instant::now(),
        }
    }

    /// Waits for a batch's first write attempt; meanwhile the records after it are received
    /// and accepted into `next` (with `receive`, up to a full batch), so that decoding them
    /// overlaps the batch's statements instead of waiting for its commit. Once the batch's
    /// raw rows are written and `next` is due (full, or its first record has waited a
    /// linger), `next` is written ahead ([`Self::spawn_attempt`], into `self.ahead`) and
    /// nothing more is received until the batch lands; if it does not, the batch written
    /// ahead is rolled back and its records read again later. The attempt goes on whatever
    /// a record waits for (a position or a tenant looked up in PostgreSQL). Gives the batch
    /// back with the outcome.
    async fn write_overlapped(
        &mut self,
        in_flight: InFlight,
        next: &mut Pending,
        receive: bool,
    ) -> (Result<Written, WriteError>, Pending) {
        let InFlight {
            mut task,
            mut raw_written,
            ..
        } = in_flight;
        let linger = Duration::from_millis(self.config.batch_linger_ms);
        let mut before: Option<Seqs> = None;
        let consumer = self.consumer.clone();
        let joined = loop {
            let may_go_ahead = receive
                && self.config.pipeline
                && self.ahead.is_none()
                && before.is_some()
                && next.len() > 0;
            let due_at = next.started.map(|t| t + linger);
            if may_go_ahead
                && (next.full(&self.config) || due_at.is_some_and(|t| t <= Instant::now()))
            {
                // What librdkafka already holds waited as long: take it along.
                self.take_ready(next).await;
                let mut batch = std::mem::take(next);
                let poison = std::mem::take(&mut batch.poison);
                let mut ahead = self.spawn_attempt(batch, before.take());
                ahead.poison = poison;
                self.ahead = Some(ahead);
                continue;
            }
            let room = receive && self.ahead.is_none() && !next.full(&self.config);
            let wake = tokio::time::Instant::from_std(due_at.unwrap_or_else(Instant::now));
            tokio::select! {
                biased;
                joined = &mut task => break joined,
                written = received(&mut raw_written) => {
                    raw_written = None;
                    if let Ok((seqs, prepared)) = written {
                        // What the batch in flight made ready, the next one need not wait for.
                        self.prepared.absorb(prepared);
                        before = Some(seqs);
                    }
                }
                _ = tokio::time::sleep_until(wake), if may_go_ahead => {}
                msg = consumer.recv(), if room => {
                    self.apply_rebalances(next);
                    match msg {
                        Ok(m) => self.accept(&m, next).await,
                        Err(e) => tracing::warn!(error = %e, "kafka consume error"),
                    }
                }
            }
        };
        let (outcome, prepared, batch) = match joined {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("a batch's write attempt was cancelled: {e}"),
        };
        self.prepared.absorb(prepared);
        if outcome.is_ok() {
            if let Some(ahead) = self.ahead.as_mut() {
                // Its poison goes to the DLQ before its offsets may be committed; if it is
                // rolled back, the records are read again and dead-lettered then.
                let poison = std::mem::take(&mut ahead.poison);
                if !poison.is_empty() {
                    self.dead_letter(&poison).await;
                }
            }
            if let Some(landed) = self.ahead.as_mut().and_then(|a| a.landed.take()) {
                let _ = landed.send(true);
            }
        } else if let Some(ahead) = self.ahead.take() {
            ahead_outcome(&self.topic, "rolled_back");
            // Rolled back before anything else is written: it may hold keys the retry writes.
            if let Some(landed) = ahead.landed {
                let _ = landed.send(false);
            }
            let mut dropped = match ahead.task.await {
                Ok((_, _, dropped)) => dropped,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("a batch's write attempt was cancelled: {e}"),
            };
            self.drop_next(&mut dropped);
        }
        (outcome, batch)
    }

    /// Drops the next batch read during a first attempt that did not land: each of its
    /// partitions is sought back to where the batch started in it and read again later
    /// (its position is looked up again then, once the batch before it has landed or not).
    /// Nothing is asked of PostgreSQL here, which may be the reason the attempt failed.
    fn drop_next(&mut self, next: &mut Pending) {
        for (partition, range) in std::mem::take(next).offsets {
            self.seek(partition, Offset::Offset(range.start));
        }
    }

    /// Finds the events of `events` that PostgreSQL refuses for their own sake, dead-letters
    /// them with the reason and takes them out. False when none was found (the failure was
    /// not theirs after all, or the search itself failed): then the batch is retried.
    async fn set_aside_refused(&mut self, events: &mut Vec<Decoded>) -> bool {
        let search = async {
            let versions = prepare::live_versions(&self.pool, &mut self.prepared, events).await?;
            batch::find_refused(&self.pool, Target::Live(&versions), events).await
        };
        let refused = match search.await {
            Ok(r) if !r.is_empty() => r,
            Ok(_) => return false,
            Err(WriteError::VersionMoved) => {
                self.prepared.forget_versions();
                return true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not find the refused events");
                return false;
            }
        };
        let poison: Vec<Poison> = refused
            .iter()
            .map(|(i, reason)| Poison::refused(&events[*i], reason.clone()))
            .collect();
        for (i, _) in refused.iter().rev() {
            events.remove(*i);
        }
        metrics::counter!("projector_refused_total", "topic" => self.topic.clone())
            .increment(poison.len() as u64);
        self.dead_letter(&poison).await;
        true
    }

    /// Pauses every assigned partition (PostgreSQL is unavailable): they stay assigned to
    /// this instance, nothing more is fetched until [`Self::rewind`] after the resume.
    fn pause(&self) -> Option<TopicPartitionList> {
        let tpl = self.consumer.assignment().ok()?;
        match self.consumer.pause(&tpl) {
            Ok(()) => {
                tracing::warn!(
                    partitions = tpl.count(),
                    "batch failing: partitions paused until it lands"
                );
                Some(tpl)
            }
            Err(e) => {
                tracing::warn!(error = %e, "pause failed");
                None
            }
        }
    }

    /// Forgets what the loop knew about `partitions` and seeks each back to its stored
    /// offset (the beginning when it has none), so nothing skipped or dropped is lost.
    async fn rewind(&mut self, partitions: &[i32]) {
        let stored = self.stored_offsets().await;
        for p in partitions {
            let to = stored
                .get(p)
                .map_or(Offset::Beginning, |o| Offset::Offset(*o));
            self.seek(*p, to);
        }
    }

    /// Forgets where the loop stood in `partition` (its next record looks its position up
    /// again) and seeks it to `to`. A failed seek is logged: the partition's next record
    /// then shows a gap and is sought back again ([`Resume::SeekBack`]).
    fn seek(&mut self, partition: i32, to: Offset) {
        self.positions.remove(&partition);
        if let Err(e) = self
            .consumer
            .seek(&self.topic, partition, to, Duration::from_secs(5))
        {
            tracing::warn!(error = %e, partition, "seek failed");
        }
    }

    /// Poison records go to the DLQ before their offsets are committed with the batch, so
    /// none is lost (a crash in between may dead-letter one twice; the DLQ is at-least-once).
    async fn dead_letter(&self, poison: &[Poison]) {
        dead_letter(&self.dlq, &self.topic, &self.dlq_topic, poison).await;
    }

    /// Commits the new offsets to Kafka too, only so that consumer-lag tools see progress.
    fn acknowledge(&self, offsets: &BTreeMap<i32, OffsetRange>) {
        let mut tpl = TopicPartitionList::new();
        for (p, r) in offsets {
            let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(r.end));
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "kafka offset commit failed (informational only)");
        }
    }

    /// Tells the budget evaluator and query-api (caches, live feed) that tenants advanced.
    /// Best effort: the truth is in PostgreSQL, so a missed notification only delays a live
    /// update (and the evaluator sweeps every tenant with budgets anyway).
    async fn notify(&mut self, tenants: &[(shared::tenant::TenantId, i64)]) {
        if let Some(alerts) = &self.alerts {
            alerts.touch(tenants.iter().map(|(t, _)| *t));
        }
        if let Some(redis) = self.redis.as_mut() {
            shared::watermark::publish(redis, tenants.iter().copied()).await;
        }
    }
}

/// One attempt at writing a live batch: its tenants' versions and schemas, then the batch
/// and its offsets in one transaction ([`batch::write`]), written ahead of the batch before
/// with `ahead_of`. With `raw_written`, told the batch's feed positions once its raw rows
/// are written, with a copy of the caches as prepared for it: the batch after it is prepared
/// from those.
async fn write_attempt(
    pool: &PgPool,
    prepared: &mut Prepared,
    (config, topic): (&Config, &str),
    batch: &Pending,
    redis: Option<&mut ConnectionManager>,
    (ahead_of, raw_written): (Option<AheadOf>, Option<oneshot::Sender<(Seqs, Prepared)>>),
) -> Result<Written, WriteError> {
    let versions = prepare::live_versions(pool, prepared, &batch.events).await?;
    prepare::prepare(
        pool,
        prepared,
        &versions,
        config.partitions_ahead_days,
        &batch.events,
        false,
    )
    .await?;
    let (seqs_tx, seqs_rx) = match raw_written {
        Some(tx) => {
            let (seqs_tx, seqs_rx) = oneshot::channel();
            (Some(seqs_tx), Some((seqs_rx, tx, prepared.clone())))
        }
        None => (None, None),
    };
    let pipeline = Pipeline {
        raw_written: seqs_tx,
        ahead_of,
    };
    let write = batch::write(
        pool,
        &config.projection,
        topic,
        Target::Live(&versions),
        &batch.events,
        &batch.offsets,
        batch::Mode::Live(redis, pipeline),
    );
    let forward = async {
        if let Some((seqs_rx, tx, snapshot)) = seqs_rx {
            if let Ok(seqs) = seqs_rx.await {
                let _ = tx.send((seqs, snapshot));
            }
        }
    };
    let (outcome, ()) = tokio::join!(write, forward);
    outcome
}

/// Counts batches written ahead ([`batch::Pipeline`]): `started`, or `not_ready` (schemas or
/// partitions to make first: it waits for the batch before instead); `rolled_back` with the
/// batch before, which did not land (the records are read again); `timed_out` when it gave up
/// waiting for the batch before, and was written again in turn.
fn ahead_outcome(topic: &str, outcome: &'static str) {
    metrics::counter!("projector_ahead_batches_total", "topic" => topic.to_string(), "outcome" => outcome)
        .increment(1);
}

/// What `rx` receives, if there is one; else never.
async fn received<T>(
    rx: &mut Option<oneshot::Receiver<T>>,
) -> Result<T, oneshot::error::RecvError> {
    match rx {
        Some(rx) => rx.await,
        None => std::future::pending().await,
    }
}

/// Since when a record has waited to be projected: since it was produced (its Kafka
/// timestamp: the create time ingest-api's producer set, by its clock), at most `linger` ago.
/// A record queued here while the batch before it was written has waited already, so the
/// batch it starts need not linger as long; a clock that runs ahead or behind this host's
/// shortens a batch's linger at most, never lengthens it.
fn waiting_since(appended_ms: Option<i64>, linger: Duration) -> Instant {
    let now = Instant::now();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let waited = appended_ms
        .map(|t| now_ms.saturating_sub(t).max(0) as u64)
        .map_or(Duration::ZERO, |ms| Duration::from_millis(ms).min(linger));
    now.checked_sub(waited).unwrap_or(now)
}

/// Decodes a record's payload: its envelope, then the payload its type names.
pub fn decode(payload: Option<&[u8]>) -> Result<Decoded, String> {
    decode_envelope(payload).and_then(decode_payload)
}

/// The envelope of a record, its payload not decoded yet.
pub(crate) fn decode_envelope(payload: Option<&[u8]>) -> Result<Envelope, String> {
    let bytes = payload.ok_or("record has no payload")?;
    serde_json::from_slice(bytes).map_err(|e| format!("undecodable envelope: {e}"))
}

/// Decodes (and validates, upcasting) an envelope's payload. A leap second in its time is
/// made the instant PostgreSQL stores (`without_leap`).
pub(crate) fn decode_payload(mut env: Envelope) -> Result<Decoded, String> {
    env.occurred_at = without_leap(env.occurred_at);
    let payload = env.payload().map_err(|errs| {
        let parts: Vec<String> = errs
            .iter()
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect();
        format!("invalid payload: {}", parts.join("; "))
    })?;
    Ok(Decoded {
        env,
        payload,
        origin: (0, 0),
    })
}

/// A leap second (`23:59:60.5`, which chrono keeps as nanoseconds past a billion) as the
/// instant PostgreSQL stores for it, the next day's `00:00:00.5`; any other time as it is.
/// Everything the projector derives from an event's time (its partition's day, its rollup
/// buckets) then agrees with what PostgreSQL makes of it: before, the leap second's minute
/// bucket `23:59:60` and the next day's `00:00` were two keys in the batch and one in the
/// database, so the batch's upsert met the same row twice (21000), which no bisection
/// blames on one record, and the partition stopped.
pub fn without_leap(at: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = at.timestamp_subsec_nanos();
    if nanos < 1_000_000_000 {
        return at;
    }
    DateTime::from_timestamp(at.timestamp() + 1, nanos - 1_000_000_000).unwrap_or(at)
}

pub(crate) fn poison(m: &BorrowedMessage<'_>, error: String) -> Poison {
    Poison {
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        partition: m.partition(),
        offset: m.offset(),
        error,
    }
}

/// Reads a header of a dead-lettered record (used by tests and `dlq` tooling).
pub fn header<'a>(m: &'a impl Message, key: &str) -> Option<&'a [u8]> {
    let headers = m.headers()?;
    headers.iter().find(|h| h.key == key).and_then(|h| h.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leap_second_is_the_instant_postgresql_stores() {
        use chrono::NaiveDate;
        let day = NaiveDate::from_ymd_opt(2026, 12, 6).unwrap();
        let leap = day
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        let stored = day
            .succ_opt()
            .unwrap()
            .and_hms_milli_opt(0, 0, 0, 500)
            .unwrap()
            .and_utc();
        assert_eq!(without_leap(leap), stored);
        assert_eq!(without_leap(leap).date_naive(), stored.date_naive());
        let last = day
            .and_hms_nano_opt(23, 59, 59, 999_999_999)
            .unwrap()
            .and_utc();
        assert_eq!(without_leap(last), last);
    }

    fn now_ms() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    #[test]
    fn a_record_waits_from_when_kafka_appended_it_at_most_a_linger() {
        // Wide margins: a loaded machine may stall between any two lines.
        let linger = Duration::from_secs(10);
        let before = Instant::now();
        // Produced 4 s ago: 6 s of its linger remain.
        let since = waiting_since(Some(now_ms() - 4_000), linger);
        let after = Instant::now();
        assert!(after.duration_since(since) >= Duration::from_secs(4));
        assert!(before.duration_since(since) < Duration::from_secs(9));
        // Produced long ago (or by a clock that runs behind): due at once, never earlier.
        let since = waiting_since(Some(now_ms() - 600_000), linger);
        assert!(Instant::now().duration_since(since) >= linger);
        assert!(before.duration_since(since) <= linger);
        // A clock that runs ahead, or no timestamp: the full linger from now.
        for appended in [Some(now_ms() + 600_000), None] {
            let before = Instant::now();
            assert!(waiting_since(appended, linger) >= before);
        }
    }
}
