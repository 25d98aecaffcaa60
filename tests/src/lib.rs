//! The end-to-end harness: starts Tally's services against the real Kafka, PostgreSQL and
//! Redis that `deploy/local/up.sh` runs, each test on its own topics and tenants so tests
//! run in parallel without stepping on each other.
//!
//! One module per job, all re-exported here (tests `use tally_tests::*;`):
//! [`environment`] (settings, test database, tenants), [`services`] (Tally's services, in
//! process or as child processes), [`infrastructure`] (private Kafka, PostgreSQL, Redis),
//! [`client`] (HTTP), [`assertions`] (what the stack holds), [`builders`] (events, times);
//! [`events`] generates load with known totals, [`bulk`] writes a projection in bulk,
//! [`oidc`] is a test identity provider, [`receiver`] a webhook receiver, [`report`]
//! records the figures of the benchmarks.

pub mod assertions;
pub mod builders;
pub mod bulk;
pub mod client;
pub mod environment;
pub mod events;
pub mod infrastructure;
pub mod oidc;
pub mod receiver;
pub mod report;
pub mod services;

pub use assertions::*;
pub use builders::*;
pub use client::*;
pub use environment::*;
pub use infrastructure::*;
pub use services::*;
