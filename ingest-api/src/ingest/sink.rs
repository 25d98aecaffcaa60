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
/// the sink's: a sink that waits for its log lets go of the records once they are written,
/// so that what a request holds while it waits is only what its log holds.
pub trait EventSink: Send + Sync + 'static {
    fn send(&self, batch: Batch) -> BoxFuture<'_, Result<(), IngestError>>;
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
    fn send(&self, batch: Batch) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(self.produce_all(batch))
    }
}

impl KafkaSink {
    async fn produce_all(&self, batch: Batch) -> Result<(), IngestError> {
        let retry_after = self.timeout.as_secs().clamp(1, 30);
        let started = Instant::now();
        let events = batch.len();
        let mut deliveries = Vec::with_capacity(events);
        // The version text is written into a buffer reused for every event: librdkafka
        // copies it as each record is queued.
        let mut version = String::new();
        for (head, key, payload) in batch.records() {
            version.clear();
            let _ = write!(version, "{}", head.schema_version);
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: "type",
                    value: Some(head.event_type.as_str()),
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
                .key(key)
                .payload(payload)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    return Err(IngestError::event_too_large(head.id, payload.len()));
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
        drop(batch);
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

/// Pieces of bytes written one after another into one buffer, each a slice of it: one
/// allocation per request rather than one or more per event.
#[derive(Debug)]
struct Pieces {
    bytes: Vec<u8>,
    /// Where each piece ends in `bytes` (the next one's start).
    ends: Vec<usize>,
}

impl Pieces {
    fn with_capacity(pieces: usize, bytes: usize) -> Pieces {
        Pieces {
            bytes: Vec::with_capacity(bytes),
            ends: Vec::with_capacity(pieces),
        }
    }

    /// Ends the piece written since the last one; its length.
    fn end(&mut self) -> usize {
        let start = self.ends.last().copied().unwrap_or(0);
        self.ends.push(self.bytes.len());
        self.bytes.len() - start
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(&self.ends)
            .map(|(start, &end)| &self.bytes[start..end])
    }
}

/// A request's stamped events as the log takes them: each serialized and keyed, the JSON
/// trees their `data` was read into let go of. Every door makes its batch as it stamps its
/// events, an event at a time ([`Batching`]), so that what a request holds while it is
/// counted against its tenant's rate and while the log takes it is its records' bytes —
/// about its body's size for JSON, at most what a foreign format's request may expand to
/// (`crate::formats::expansion`) — not the trees, which may take many times that: 24
/// requests of 1 000 events, each holding its trees while the rate limiter answered, made
/// ingest-api's peak 162 to 192 MiB.
#[derive(Debug)]
pub struct Batch {
    records: Pieces,
    /// Each event's Kafka key ([`Envelope::write_kafka_key`]).
    keys: Pieces,
    heads: Vec<Head>,
}

/// What a record's headers and errors say of its event.
#[derive(Debug)]
struct Head {
    id: uuid::Uuid,
    event_type: shared::events::EventType,
    schema_version: u32,
}

impl Batch {
    /// Every event serialized, sized and keyed ([`Batching`]).
    pub fn of(envelopes: Vec<Stamped>) -> Result<Batch, IngestError> {
        let mut batching = Batching::with_capacity(envelopes.len());
        batching.extend(envelopes);
        batching.finish()
    }

    pub fn len(&self) -> usize {
        self.heads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// The events' ids, in the batch's order.
    pub fn ids(&self) -> impl Iterator<Item = uuid::Uuid> + '_ {
        self.heads.iter().map(|h| h.id)
    }

    /// Each event's bytes as the log stores them, in the batch's order.
    pub fn payloads(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.records.iter()
    }

    /// Each event's head, key and bytes.
    fn records(&self) -> impl Iterator<Item = (&Head, &[u8], &[u8])> + '_ {
        self.heads
            .iter()
            .zip(self.keys.iter())
            .zip(self.records.iter())
            .map(|((head, key), payload)| (head, key, payload))
    }
}

/// A [`Batch`] being made as a door stamps its events: each envelope is serialized, sized
/// and keyed as it comes, and let go of. An event too large for the log
/// (`message.max.bytes`, 1 MB) refuses the request whole ([`Batching::finish`]), as
/// resending cannot help.
#[derive(Debug)]
pub struct Batching {
    batch: Batch,
    failed: Option<IngestError>,
    /// The key text, written into a buffer reused for every event.
    key: String,
}

impl Batching {
    /// For about `n` events.
    pub fn with_capacity(n: usize) -> Batching {
        Batching {
            batch: Batch {
                records: Pieces::with_capacity(
                    n,
                    n.saturating_mul(ENVELOPE_BYTES_GUESS).min(FIRST_BUFFER_MAX),
                ),
                keys: Pieces::with_capacity(
                    n,
                    n.saturating_mul(KEY_BYTES_GUESS).min(FIRST_BUFFER_MAX),
                ),
                heads: Vec::with_capacity(n),
            },
            failed: None,
            key: String::new(),
        }
    }

    /// The events taken so far.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// `env` serialized and keyed into the batch (nothing more once one has failed).
    pub fn push(&mut self, env: Stamped) {
        if self.failed.is_some() {
            return;
        }
        let Batch {
            records,
            keys,
            heads,
        } = &mut self.batch;
        if let Err(e) = serde_json::to_writer(&mut records.bytes, &env) {
            self.failed = Some(IngestError::internal("envelope serialization failed", e));
            return;
        }
        let len = records.end();
        if len > MAX_STORED_EVENT_BYTES {
            self.failed = Some(IngestError::event_too_large(env.id, len));
            return;
        }
        self.key.clear();
        env.write_kafka_key(&mut self.key);
        keys.bytes.extend_from_slice(self.key.as_bytes());
        keys.end();
        heads.push(Head {
            id: env.id,
            event_type: env.event_type,
            schema_version: env.schema_version,
        });
    }

    /// The batch, or why it cannot be appended.
    pub fn finish(self) -> Result<Batch, IngestError> {
        match self.failed {
            Some(e) => Err(e),
            None => Ok(self.batch),
        }
    }
}

impl Extend<Stamped> for Batching {
    fn extend<I: IntoIterator<Item = Stamped>>(&mut self, envelopes: I) {
        for env in envelopes {
            self.push(env);
        }
    }
}

/// About what one envelope takes serialized, for the buffer's first size.
const ENVELOPE_BYTES_GUESS: usize = 512;
/// About what one key takes: a tenant id, a colon and a session id.
const KEY_BYTES_GUESS: usize = 80;
/// The buffers' largest first size: the foreign formats' requests may hold 50 000 small
/// events, and the buffer grows as the events need.
const FIRST_BUFFER_MAX: usize = 1 << 20;

/// A sink that keeps what it is given, for tests of the doors without a broker: each record
/// read back as an envelope, as the projector reads it. It fails every batch while `fail`
/// is set.
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
    fn send(&self, batch: Batch) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(async move {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(IngestError::Unavailable {
                    detail: "the recording sink is set to fail".into(),
                    retry_after: 1,
                });
            }
            self.sent.lock().expect("not poisoned").extend(
                batch
                    .payloads()
                    .map(|p| serde_json::from_slice::<Envelope>(p).expect("a record reads back")),
            );
            Ok(())
        })
    }
}
