//! The outbox relay: sends this deployment's unsent `control.outbox` rows to the auth topic,
//! in order, and marks them sent only after Kafka acknowledged them. At-least-once (a crash
//! between the two resends); the projector's event-id key makes the audit log exactly-once.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use tokio::sync::Notify;

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
    let sends = rows.iter().map(|(_, key, payload)| {
        producer.send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(5),
        )
    });
    for result in join_all(sends).await {
        result.map_err(|(e, _)| e)?;
    }
    let seqs: Vec<i64> = rows.iter().map(|(s, _, _)| *s).collect();
    sqlx::query("UPDATE control.outbox SET sent_at = now() WHERE seq = ANY($1)")
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows.len())
}
