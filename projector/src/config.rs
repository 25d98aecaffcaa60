//! The projector's configuration (see `shared::config` for how it is loaded).

use serde::{Deserialize, Serialize};
use shared::config::Common;

use crate::schema::timescale::Timescale;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub common: Common,
    /// Whether tenant schemas get TimescaleDB hypertables (see [`Timescale`]).
    pub timescale: Timescale,
    /// Name of this projection in `control.projector_offsets`.
    pub projection: String,
    /// Consumer group; every projection version has its own.
    pub consumer_group: String,
    /// Largest batch written in one transaction.
    pub batch_max_events: usize,
    /// Largest batch in bytes of the records as Kafka holds them (a batch takes its first
    /// record whatever its size). Events are up to about a megabyte each: counted alone, a
    /// batch of large ones held gigabytes in the projector, in PostgreSQL's bind buffers and in
    /// the statement that writes them (whose parameters PostgreSQL refuses past 1 GB).
    pub batch_max_bytes: usize,
    /// How long a batch may wait to fill up before it is written, counted from when its
    /// first record was produced (its Kafka timestamp): records that queued while the batch
    /// before was written have waited already.
    pub batch_linger_ms: u64,
    /// Whether a live batch writes its raw rows while the batch before it writes the rest and
    /// commits (two transactions in flight, committed in order; see `batch::Pipeline`).
    pub pipeline: bool,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub http_addr: String,
    /// Days of partitions created ahead of time when a tenant is first seen.
    pub partitions_ahead_days: i64,
    /// How soon the group notices a dead instance and hands its partitions to another.
    pub consumer_session_timeout_ms: u64,
    /// How much librdkafka prefetches for the consume loop (`queued.max.messages.kbytes`):
    /// what a projector behind its log holds besides the batches in flight. 2 MB drains a
    /// backlog as fast as 8 MB did, with about 20 MB less at the peak, now that librdkafka
    /// fetches again 10 ms after the queue was full (`consumer::FETCH_QUEUE_BACKOFF_MS`;
    /// tests/PERFORMANCE.md, twenty-fourth session).
    pub consumer_queue_kbytes: u32,
    /// How often the compactor folds the per-key rollup deltas that batches append into
    /// one row per key (see `compactor`).
    pub compact_interval_ms: u64,
    /// How often retention runs (drops old partitions, creates the coming days', sweeps the
    /// control schema).
    pub retention_interval_secs: u64,
    /// Days relayed outbox rows are kept (they are in Kafka; see `housekeeping`).
    pub outbox_keep_days: i64,
    /// Days closed invitations, revoked API keys, finished deliveries, firings and outbox rows
    /// Kafka refused are kept; at least `housekeeping::MIN_HISTORY_DAYS`.
    pub history_keep_days: i64,
    /// How long `replay` waits after switching before it drops the old version, so that
    /// requests that started on it finish.
    pub replay_drop_grace_secs: u64,
    /// Whether `replay` bulk-loads the log up to where it ended when the replay started
    /// (`COPY`, indexes built at the end, rollups folded across batches) before it catches up
    /// batch by batch. Off, every record takes the live path.
    pub replay_bulk: bool,
    /// How long a consume loop may fail to commit its batch before `/readyz` answers 503.
    pub stall_unready_secs: u64,
    /// Whether this instance evaluates budgets and delivers notifications (any number of
    /// instances may; each crossing fires once).
    pub alerts: bool,
    /// Where notifications link to: query-api's dashboard page as people reach it.
    pub dashboard_url: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            // Two consume loops, retention, alerting and health checks need a few connections;
            // each one keeps buffers as large as the largest batch it carried, so fewer stay
            // resident.
            common: Common {
                db_max_connections: 8,
                ..Common::default()
            },
            timescale: Timescale::Auto,
            projection: "metrics".into(),
            consumer_group: "tally-projector-metrics".into(),
            batch_max_events: 5000,
            batch_max_bytes: 8 << 20,
            batch_linger_ms: 100,
            pipeline: true,
            http_addr: "127.0.0.1:9102".into(),
            partitions_ahead_days: 7,
            consumer_session_timeout_ms: 10_000,
            consumer_queue_kbytes: 2048,
            compact_interval_ms: 5000,
            retention_interval_secs: 3600,
            outbox_keep_days: 7,
            history_keep_days: 90,
            replay_drop_grace_secs: 10,
            replay_bulk: true,
            stall_unready_secs: 30,
            alerts: true,
            dashboard_url: "http://127.0.0.1:8081/".into(),
        }
    }
}

impl Config {
    pub fn check(&self) -> Result<(), String> {
        self.common.check()?;
        if self.batch_max_events == 0 {
            return Err("batch_max_events must be at least 1".into());
        }
        if self.batch_max_bytes == 0 {
            return Err("batch_max_bytes must be at least 1".into());
        }
        // librdkafka's own bounds for `queued.max.messages.kbytes`.
        if !(1..=2_097_151).contains(&self.consumer_queue_kbytes) {
            return Err("consumer_queue_kbytes must be between 1 and 2097151".into());
        }
        if self.projection.is_empty() || self.consumer_group.is_empty() {
            return Err("projection and consumer_group must not be empty".into());
        }
        if !(1..=3650).contains(&self.outbox_keep_days) {
            return Err("outbox_keep_days must be between 1 and 3650".into());
        }
        let least = crate::housekeeping::MIN_HISTORY_DAYS;
        if !(least..=3650).contains(&self.history_keep_days) {
            return Err(format!(
                "history_keep_days must be between {least} and 3650"
            ));
        }
        Ok(())
    }

    /// How long the control schema's housekeeping keeps what is finished.
    pub fn keep(&self) -> crate::housekeeping::Keep {
        crate::housekeeping::Keep {
            outbox_days: self.outbox_keep_days,
            history_days: self.history_keep_days,
        }
    }
}
