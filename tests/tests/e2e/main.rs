//! End-to-end tests over real Kafka, PostgreSQL and Redis (`deploy/local/up.sh`).
//! One binary, one module per capability; every test has its own topics and tenants.

mod access;
mod alerts;
mod attribution;
mod audit;
mod bulk;
mod control;
mod crash;
mod dashboard;
mod dedup;
mod dlq;
mod explore;
mod hook;
mod housekeeping;
mod influx;
mod instances;
mod isolation;
mod kafka_down;
mod lane;
mod late;
mod limits;
mod login;
mod mcp;
mod otlp;
mod overload;
mod pipeline;
mod poison;
mod privacy;
mod promrw;
mod replay;
mod schema;
mod sso;
mod stream;
mod timescale;
mod validation;
mod wire;
