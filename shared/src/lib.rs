//! What every Tally service shares: the event contract (events, the user and team snapshots),
//! configuration, telemetry, health, problem responses, API keys, tenant identifiers, and
//! Kafka/PostgreSQL client setup.
#![forbid(unsafe_code)]

pub mod apikey;
pub mod auth;
pub mod budgets;
pub mod config;
pub mod cursor;
pub mod db;
pub mod events;
pub mod health;
pub mod histogram;
pub mod json_eq;
pub mod jwt;
pub mod kafka;
pub mod outbox;
pub mod people;
pub mod per_tenant;
pub mod problem;
pub mod ratelimit;
pub mod redis_client;
pub mod repos;
pub mod rfc3339;
pub mod rules;
pub mod secretbox;
pub mod serve;
pub mod telemetry;
pub mod tenant;
pub mod tenant_sql;
pub mod watermark;
pub mod webhooks;
