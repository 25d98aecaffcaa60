//! Prometheus remote-write bodies: the input as the snappy block it should be, and as the
//! protobuf inside one (compressed here, so mutations reach the message, not just snappy).
#![no_main]

use ingest_api::formats::promrw;
use ingest_api::ingest::Ids;
use libfuzzer_sys::fuzz_target;
use shared::events::Source;

/// ingest-api's default `max_body_bytes`.
const LIMIT: usize = 10 * 1024 * 1024;

fn write(body: &[u8]) {
    let Ok(req) = promrw::decode(body, LIMIT) else {
        return;
    };
    let Ok(events) = promrw::to_events(&req) else {
        return;
    };
    tally_fuzz::envelopes(&tally_fuzz::context(Source::PromRw, Ids::Content), events);
}

fuzz_target!(|data: &[u8]| {
    write(data);
    let block = snap::raw::Encoder::new()
        .compress_vec(data)
        .expect("snappy compresses any input");
    write(&block);
});
