//! Kafka client setup shared by the services.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Common;

/// The base client config: brokers and sane timeouts.
pub fn client_config(common: &Common) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &common.kafka_brokers)
        .set("socket.keepalive.enable", "true")
        // The default (5 min) keeps a dead broker's address cached for too long in tests.
        .set("reconnect.backoff.max.ms", "2000");
    c
}

/// The durable producer: every record is acknowledged by all in-sync replicas, and the
/// idempotent producer keeps librdkafka's own retries from writing a record twice.
/// `timeout` bounds how long a record may wait for that acknowledgement.
pub fn producer(common: &Common, timeout: Duration) -> Result<FutureProducer, KafkaError> {
    client_config(common)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", timeout.as_millis().to_string())
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "200000")
        .set("queue.buffering.max.kbytes", "262144")
        .create()
}

/// Creates the topics that do not exist yet (idempotent).
pub async fn ensure_topics(common: &Common, topics: &[String]) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(common).create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                common.kafka_partitions,
                TopicReplication::Fixed(common.kafka_replication_factor),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(%topic, ?code, "could not create topic");
                })
            }
        }
    }
    Ok(())
}
