//! Where accepted events go. The sink is the mechanism only: every decision about what to
//! accept is made upstream by the doors; a sink appends a whole batch, or says why it could
//! not.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{join_all, BoxFuture};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use shared::events::Envelope;

use super::Stamped;
use crate::error::IngestError;

/// Appends envelopes to the event log.
///
/// Contract: `send` returns `Ok` only once every envelope of the batch is durable (for Kafka:
/// acknowledged with `acks=all`); on `Err` any of them may or may not have been written, and
/// the client retries with the same event ids, which the projector counts once. The batch is
/// the sink's: a sink that waits for its log lets go of the envelopes (and the trees they
/// may hold) once they are written, so that what a request holds while it waits is only
/// what its log holds.
pub trait EventSink: Send + Sync + 'static {
    fn send(&self, envelopes: Vec<Stamped>) -> BoxFuture<'_, Result<(), IngestError>>;
}

/// The largest event the log takes, as stored: Kafka's `message.max.bytes` (1 000 000) less
/// room for the key and headers.
pub const MAX_STORED_EVENT_BYTES: usize = 990_000;

/// The Kafka topic of the metric events, written through the shared producer.
pub struct KafkaSink {
    producer: FutureProducer,
    topic: Arc<str>,
    timeout: Duration,
}

impl KafkaSink {
    /// `timeout` is the producer's `message.timeout.ms`: how long a batch may wait for its
    /// acknowledgements.
    pub fn new(producer: FutureProducer, topic: impl Into<Arc<str>>, timeout: Duration) -> Self {
        KafkaSink {
            producer,
            topic: topic.into(),
            timeout,
        }
    }
}

impl EventSink for KafkaSink {
    /// Starts every send, then waits for all acknowledgements together.
    fn send(&self, envelopes: Vec<Stamped>) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(self.produce_all(envelopes))
    }
}

impl KafkaSink {
    async fn produce_all(&self, envelopes: Vec<Stamped>) -> Result<(), IngestError> {
        let retry_after = self.timeout.as_secs().clamp(1, 30);
        let started = Instant::now();
        let events = envelopes.len();
        let payloads = serialize(&envelopes)?;
        let mut deliveries = Vec::with_capacity(envelopes.len());
        // The key and version texts are written into buffers reused for every event:
        // librdkafka copies them as each record is queued.
        let mut key = String::new();
        let mut version = String::new();
        for (env, payload) in envelopes.iter().zip(payloads.iter()) {
            key.clear();
            env.write_kafka_key(&mut key);
            version.clear();
            let _ = write!(version, "{}", env.schema_version);
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: "type",
                    value: Some(env.event_type.as_str()),
                })
                .insert(Header {
                    key: "schema_version",
                    value: Some(version.as_str()),
                })
                .insert(Header {
                    key: "content-type",
                    value: Some("application/json"),
                });
            let record = FutureRecord::to(&self.topic)
                .key(&key)
                .payload(payload)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    return Err(IngestError::event_too_large(env.id, payload.len()));
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    metrics::counter!("ingest_rejected_total", "reason" => "queue_full")
                        .increment(1);
                    return Err(IngestError::Unavailable {
                        detail: "the ingest queue is full; retry with the same event ids".into(),
                        retry_after,
                    });
                }
                Err((e, _)) => {
                    tracing::error!(error = %e, "kafka produce failed");
                    return Err(IngestError::Unavailable {
                        detail: "events could not be queued".into(),
                        retry_after,
                    });
                }
            }
        }
        // librdkafka copied every record as it was queued: nothing of the batch is held
        // while the acknowledgements are awaited.
        drop((envelopes, payloads));
        // librdkafka gives up on a record after `message.timeout.ms` (= the produce timeout);
        // the outer timeout is only a guard against a lost delivery report.
        let results = tokio::time::timeout(
            self.timeout + Duration::from_millis(500),
            join_all(deliveries),
        )
        .await;
        metrics::histogram!("kafka_produce_seconds").record(started.elapsed().as_secs_f64());
        let failed = match results {
            Err(_) => Some("timed out".to_string()),
            Ok(results) => results.into_iter().find_map(|r| match r {
                Ok(Ok(_)) => None,
                Ok(Err((e, _))) => Some(e.to_string()),
                Err(_) => Some("delivery cancelled".into()),
            }),
        };
        match failed {
            None => Ok(()),
            Some(reason) => {
                tracing::warn!(%reason, events, "kafka did not acknowledge the batch");
                metrics::counter!("ingest_rejected_total", "reason" => "kafka_unavailable")
                    .increment(1);
                Err(IngestError::Unavailable {
                    detail: "the event log did not acknowledge the events in time; retry with \
                             the same event ids"
                        .into(),
                    retry_after,
                })
            }
        }
    }
}

/// A batch's envelopes serialized into one buffer, each event's bytes a slice of it: one
/// allocation per request rather than a few per event.
#[derive(Debug)]
pub struct Serialized {
    bytes: Vec<u8>,
    /// Where each event's bytes end in `bytes` (the next one's start).
    ends: Vec<usize>,
}

impl Serialized {
    /// Each event's bytes, in the batch's order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .map(|(start, &end)| &self.bytes[start..end])
    }
}

/// About what one envelope takes serialized, for the buffer's first size.
const ENVELOPE_BYTES_GUESS: usize = 512;
/// The buffer's largest first size: the foreign formats' requests may hold 50 000 small
/// events, and the buffer grows as the events need.
const FIRST_BUFFER_MAX: usize = 1 << 20;

/// Every event serialized and sized before any is sent: one too large for the log
/// (`message.max.bytes`, 1 MB) refuses the request whole, and resending cannot help.
pub fn serialize(envelopes: &[Stamped]) -> Result<Serialized, IngestError> {
    let mut out = Serialized {
        bytes: Vec::with_capacity(
            envelopes
                .len()
                .saturating_mul(ENVELOPE_BYTES_GUESS)
                .min(FIRST_BUFFER_MAX),
        ),
        ends: Vec::with_capacity(envelopes.len()),
    };
    for env in envelopes {
        let start = out.bytes.len();
        serde_json::to_writer(&mut out.bytes, env)
            .map_err(|e| IngestError::internal("envelope serialization failed", e))?;
        let len = out.bytes.len() - start;
        if len > MAX_STORED_EVENT_BYTES {
            return Err(IngestError::event_too_large(env.id, len));
        }
        out.ends.push(out.bytes.len());
    }
    Ok(out)
}

/// A sink that keeps what it is given, for tests of the doors without a broker, each
/// envelope's `data` as the JSON it is written as. It applies the same size check as the
/// Kafka sink, and fails every batch while `fail` is set.
#[derive(Clone, Default)]
pub struct RecordingSink {
    sent: Arc<Mutex<Vec<Envelope>>>,
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl RecordingSink {
    /// Every envelope sent so far, in order.
    pub fn sent(&self) -> Vec<Envelope> {
        self.sent.lock().expect("not poisoned").clone()
    }

    /// Makes every following batch fail as an unavailable log would.
    pub fn fail(&self, fail: bool) {
        self.fail.store(fail, std::sync::atomic::Ordering::SeqCst);
    }
}

impl EventSink for RecordingSink {
    fn send(&self, envelopes: Vec<Stamped>) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(async move {
            serialize(&envelopes)?;
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(IngestError::Unavailable {
                    detail: "the recording sink is set to fail".into(),
                    retry_after: 1,
                });
            }
            self.sent.lock().expect("not poisoned").extend(
                envelopes
                    .into_iter()
                    .map(|e| e.map_data(super::Data::into_value)),
            );
            Ok(())
        })
    }
}
