//! The ingest core every door shares: the door itself (key, rate limit, body), the stamping
//! of client events into envelopes, and the sink that appends them to the event log.

pub mod door;
pub mod envelope;
pub mod lane;
pub mod privacy;
pub mod sink;
pub mod storable;
pub mod values;

pub use envelope::{ClientEvent, Data, Ids, IngestContext, Keep, SampleEvent, Stamped, TimeBounds};

#[cfg(test)]
mod tests;
