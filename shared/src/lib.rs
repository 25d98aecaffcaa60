//! What every Tally service shares: the event contract, configuration, telemetry, health,
//! problem responses, API keys, tenant identifiers, and Kafka/PostgreSQL client setup.
#![forbid(unsafe_code)]

pub mod apikey;
pub mod auth;
pub mod config;
pub mod db;
pub mod events;
pub mod expansion;
pub mod health;
pub mod histogram;
pub mod jwt;
pub mod kafka;
pub mod lineproto;
pub mod otlp;
pub mod outbox;
pub mod password;
pub mod problem;
pub mod promrw;
pub mod protowire;
pub mod ratelimit;
pub mod redis_client;
pub mod secretbox;
pub mod telemetry;
pub mod tenant;
pub mod tenant_sql;
pub mod watermark;
