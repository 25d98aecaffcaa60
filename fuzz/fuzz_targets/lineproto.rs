//! InfluxDB line-protocol bodies, in every precision, as `routes/influx.rs` takes them: each
//! line's samples validated like any event.
#![no_main]

use ingest_api::formats::lineproto::{self, Precision};
use ingest_api::ingest::Ids;
use libfuzzer_sys::fuzz_target;
use shared::events::Source;

fuzz_target!(|body: &[u8]| {
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    if text.lines().count() > lineproto::MAX_LINES {
        return;
    }
    let ctx = tally_fuzz::context(Source::Influx, Ids::Content);
    for precision in [Precision::Ns, Precision::Us, Precision::Ms, Precision::S] {
        // A body over the request's bounds is refused whole (413), with nothing built.
        let Ok((points, bad)) = lineproto::parse(text, precision) else {
            continue;
        };
        for p in &points {
            assert!(p.line >= 1 && !bad.iter().any(|b| b.line == p.line));
            tally_fuzz::envelopes(&ctx, p.to_events(tally_fuzz::now()));
        }
    }
});
