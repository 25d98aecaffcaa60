//! The foreign formats the write side takes, each turned into client events of the contract:
//! OpenTelemetry (`otlp`), Prometheus remote write (`promrw`), InfluxDB line protocol
//! (`lineproto`), with the protobuf wire walker and the expansion budget they share.

pub mod expansion;
pub mod lineproto;
pub mod otlp;
pub mod promrw;
pub mod protowire;
