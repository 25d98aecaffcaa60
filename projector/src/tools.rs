//! Operator tools: `projector status` (stored offsets, log ends, lag) and
//! `projector dlq list|show|redrive` (inspect dead letters and send them back after a fix).

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use sqlx::PgPool;

use crate::config::Config;

const TIMEOUT: Duration = Duration::from_secs(10);

/// One partition's progress.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub projection: String,
    pub topic: String,
    pub partition: i32,
    /// Next offset the projection will project (0 if it never has).
    pub stored: i64,
    /// The partition's log end (high watermark).
    pub log_end: i64,
    pub lag: i64,
    /// Since when this partition's batch keeps failing (None while it flows).
    pub stalled_since: Option<chrono::DateTime<chrono::Utc>>,
    /// Why it last failed.
    pub last_error: Option<String>,
}

/// A stored offset row: partition, next offset, stalled since, last error.
type StoredRow = (
    i32,
    i64,
    Option<chrono::DateTime<chrono::Utc>>,
    Option<String>,
);

/// Progress of the configured projection on every partition of its topics.
pub async fn status(config: &Config, pool: &PgPool) -> anyhow::Result<Vec<PartitionStatus>> {
    let common = &config.common;
    let mut out = Vec::new();
    for topic in [common.metrics_topic(), common.auth_topic()] {
        let rows: Vec<StoredRow> = sqlx::query_as(
            "SELECT partition, next_offset, stalled_since, last_error
               FROM control.projector_offsets WHERE projection = $1 AND topic = $2",
        )
        .bind(&config.projection)
        .bind(&topic)
        .fetch_all(pool)
        .await?;
        let stored: std::collections::HashMap<i32, StoredRow> =
            rows.into_iter().map(|r| (r.0, r)).collect();
        let consumer: BaseConsumer = shared::kafka::client_config(common).create()?;
        let t = topic.clone();
        let ends = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(i32, i64)>> {
            let md = consumer.fetch_metadata(Some(&t), TIMEOUT)?;
            let parts = md
                .topics()
                .first()
                .map(|m| m.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
                .unwrap_or_default();
            parts
                .into_iter()
                .map(|p| Ok((p, consumer.fetch_watermarks(&t, p, TIMEOUT)?.1)))
                .collect()
        })
        .await??;
        for (partition, log_end) in ends {
            let (_, s, stalled_since, last_error) = stored
                .get(&partition)
                .cloned()
                .unwrap_or((partition, 0, None, None));
            out.push(PartitionStatus {
                projection: config.projection.clone(),
                topic: topic.clone(),
                partition,
                stored: s,
                log_end,
                lag: (log_end - s).max(0),
                stalled_since,
                last_error,
            });
        }
    }
    out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(out)
}

/// A record in a dead-letter topic, with where it came from and why.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub source_topic: String,
    pub source_partition: String,
    pub source_offset: String,
    pub error: String,
    #[serde(skip)]
    pub key: Option<Vec<u8>>,
    #[serde(skip)]
    pub payload: Option<Vec<u8>>,
}

impl DeadLetter {
    pub fn payload_text(&self) -> String {
        self.payload
            .as_deref()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default()
    }
}

/// Every record of a dead-letter topic, read from the beginning to the current end.
pub async fn dead_letters(config: &Config, dlq_topic: &str) -> anyhow::Result<Vec<DeadLetter>> {
    let consumer: BaseConsumer = shared::kafka::client_config(&config.common)
        .set("group.id", "tally-dlq-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let topic = dlq_topic.to_string();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<DeadLetter>> {
        let md = consumer.fetch_metadata(Some(&topic), TIMEOUT)?;
        let parts: Vec<i32> = md
            .topics()
            .first()
            .map(|m| m.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        let mut remaining = 0;
        let mut ends = std::collections::HashMap::new();
        for p in parts {
            let (low, high) = consumer.fetch_watermarks(&topic, p, TIMEOUT)?;
            if high > low {
                tpl.add_partition_offset(&topic, p, Offset::Offset(low))?;
                remaining += high - low;
                ends.insert(p, high);
            }
        }
        let mut out = Vec::new();
        if remaining == 0 {
            return Ok(out);
        }
        consumer.assign(&tpl)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while remaining > 0 && std::time::Instant::now() < deadline {
            let Some(m) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let m = m?;
            if m.offset() >= ends.get(&m.partition()).copied().unwrap_or(0) {
                continue;
            }
            remaining -= 1;
            let h = |k: &str| {
                crate::consumer::header(&m, k)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            out.push(DeadLetter {
                partition: m.partition(),
                offset: m.offset(),
                source_topic: h("tally-source-topic"),
                source_partition: h("tally-source-partition"),
                source_offset: h("tally-source-offset"),
                error: h("tally-error"),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
            });
        }
        out.sort_by_key(|d| (d.partition, d.offset));
        Ok(out)
    })
    .await?
}

/// Sends dead letters back to the topics they came from. The projector dedups by event id,
/// so redriving a record twice, or one that was projected after all, counts it once.
pub async fn redrive(config: &Config, letters: &[DeadLetter]) -> anyhow::Result<usize> {
    let producer = shared::kafka::producer(&config.common, TIMEOUT)?;
    let mut sent = 0;
    for d in letters {
        anyhow::ensure!(
            !d.source_topic.is_empty(),
            "dead letter {}/{} has no source topic header",
            d.partition,
            d.offset
        );
        let from = format!("dlq/{}/{}", d.partition, d.offset);
        let headers = OwnedHeaders::new().insert(Header {
            key: "tally-redriven-from",
            value: Some(from.as_str()),
        });
        let mut rec: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&d.source_topic).headers(headers);
        if let Some(k) = &d.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(p) = &d.payload {
            rec = rec.payload(p.as_slice());
        }
        producer.send(rec, TIMEOUT).await.map_err(|(e, _)| e)?;
        sent += 1;
    }
    Ok(sent)
}
