//! The outbox relay: sends this deployment's unsent `control.outbox` rows to the auth topic,
//! in order, and marks them sent only after Kafka acknowledged them. At-least-once (a crash
//! between the two resends); the projector's event-id key makes the audit log exactly-once.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::ingest::sink::MAX_STORED_EVENT_BYTES;

const BATCH: i64 = 500;
/// Other instances' rows (written by the admin CLI, say) are picked up this often.
const POLL: Duration = Duration::from_millis(500);

/// Runs the relay for as long as the process lives. `wake` lets handlers that just wrote a
/// row have it sent at once.
pub fn spawn(
    pool: PgPool,
    producer: FutureProducer,
    topic: String,
    namespace: String,
    wake: Arc<Notify>,
) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        loop {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
            if pool.is_closed() {
                // The service shut down (it closes the pool last).
                return;
            }
            loop {
                match relay_batch(&pool, &producer, &topic, &namespace).await {
                    Ok(0) => {
                        backoff = Duration::from_millis(500);
                        break;
                    }
                    Ok(n) => {
                        metrics::counter!("outbox_relayed_total").increment(n as u64);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "outbox relay failed; rows stay queued");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        break;
                    }
                }
            }
        }
    });
}

async fn relay_batch(
    pool: &PgPool,
    producer: &FutureProducer,
    topic: &str,
    namespace: &str,
) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT seq, record_key, envelope::text FROM control.outbox
          WHERE sent_at IS NULL AND namespace = $1
          ORDER BY seq LIMIT $2
          FOR UPDATE SKIP LOCKED",
    )
    .bind(namespace)
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    // A row the log can never take is set aside, not sent: trying it again would fail every
    // batch it is in, and every tenant's events behind it would wait for ever.
    let (sendable, too_large): (Vec<_>, Vec<_>) = rows
        .iter()
        .partition(|(_, key, payload)| key.len() + payload.len() <= MAX_STORED_EVENT_BYTES);
    let sends = sendable.iter().map(|(_, key, payload)| {
        producer.send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(5),
        )
    });
    let mut refused: Vec<(i64, String)> = too_large
        .iter()
        .map(|(seq, key, payload)| {
            let bytes = key.len() + payload.len();
            (
                *seq,
                format!("{bytes} bytes: the log takes at most {MAX_STORED_EVENT_BYTES}"),
            )
        })
        .collect();
    for ((seq, _, _), result) in sendable.iter().zip(join_all(sends).await) {
        match result {
            Ok(_) => {}
            Err((e, _)) if never_taken(&e) => refused.push((*seq, e.to_string())),
            Err((e, _)) => return Err(e.into()),
        }
    }
    let seqs: Vec<i64> = rows.iter().map(|(s, _, _)| *s).collect();
    sqlx::query("UPDATE control.outbox SET sent_at = now() WHERE seq = ANY($1)")
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
    if !refused.is_empty() {
        let (seqs, reasons): (Vec<i64>, Vec<String>) = refused.into_iter().unzip();
        sqlx::query(
            "UPDATE control.outbox o SET refused = r.reason
               FROM UNNEST($1::bigint[], $2::text[]) AS r(seq, reason) WHERE o.seq = r.seq",
        )
        .bind(&seqs)
        .bind(&reasons)
        .execute(&mut *tx)
        .await?;
        for (seq, reason) in seqs.iter().zip(&reasons) {
            tracing::error!(
                seq,
                reason,
                "outbox row refused by the log; set aside, not sent"
            );
        }
        metrics::counter!("outbox_refused_total").increment(seqs.len() as u64);
    }
    tx.commit().await?;
    Ok(rows.len())
}

/// Whether Kafka refused a record for what it is (sending it again cannot help), rather than
/// for the state of the broker or the connection.
fn never_taken(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}
