//! OTLP/HTTP protobuf bodies, tried as a metrics and as a logs export.
#![no_main]

use ingest_api::formats::otlp::{Encoding, Logs, Metrics};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    tally_fuzz::otlp::<Metrics>(body, Encoding::Protobuf);
    tally_fuzz::otlp::<Logs>(body, Encoding::Protobuf);
});
