//! How large a request may become once it is turned into events. The foreign formats repeat
//! shared text in every event they make (OTLP a resource's attributes in each point, line
//! protocol a line's tags in each field's sample, remote write a series' labels in each
//! sample), so a small body can ask for gigabytes. Each decoder adds up what its events
//! would weigh, from what it has read, and asks [`check`] before it builds any. A repeated
//! label or attribute weighs what it holds in memory while the events are built (a map entry
//! and its strings), not its few bytes of text: a resource of a thousand empty attributes
//! copied into ten thousand log records is ten million entries, nearly 3 GB at the 280 to
//! 290 bytes each measured, from a body of 45 KB.

use shared::events::FieldError;

/// Most a request may expand to, in bytes of events (about: their text and their entries).
pub const MAX_EXPANDED_BYTES: usize = 64 * 1024 * 1024;

/// What one event weighs besides the text it repeats (its type, time, ids, value, the
/// envelope's fields), about.
pub const EVENT_OVERHEAD: usize = 256;

/// What one repeated label or attribute holds besides its text while its event is built and
/// sent: its map entries (key and value headers, a share of their tree's nodes, small heap
/// allocations) in the event's tree and in its decoded payload, and its share of the record.
/// Measured: a resource of 1 000 empty attributes over 100 to 450 log records took 280 to
/// 290 bytes of ingest-api's resident memory per copied attribute.
pub const ENTRY_OVERHEAD: usize = 256;

/// What `events` events repeat: `bytes` of text in `entries` labels or attributes (or
/// neither, for a name).
#[derive(Debug, Clone, Copy, Default)]
pub struct Shared {
    pub bytes: usize,
    pub entries: usize,
}

/// About how many bytes `events` events weigh when each repeats `shared`.
pub fn weight(events: usize, shared: Shared) -> usize {
    let each = shared
        .bytes
        .saturating_add(shared.entries.saturating_mul(ENTRY_OVERHEAD))
        .saturating_add(EVENT_OVERHEAD);
    events.saturating_mul(each)
}

/// Refuses a request whose events would weigh more than [`MAX_EXPANDED_BYTES`]; the error
/// names `field` and says what is repeated (`each point carries its resource's attributes`).
pub fn check(field: &str, expanded: usize, repeated: &str) -> Result<(), FieldError> {
    if expanded > MAX_EXPANDED_BYTES {
        return Err(FieldError::new(
            field,
            format!(
                "the request would make about {} MiB of events ({repeated}); at most {} MiB",
                expanded >> 20,
                MAX_EXPANDED_BYTES >> 20
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_is_checked_without_overflow() {
        let shared = |bytes, entries| Shared { bytes, entries };
        assert!(check("x", weight(1000, shared(1000, 10)), "r").is_ok());
        // A thousand empty attributes in each of ten thousand records: refused, though their
        // text is 60 MB.
        assert!(check("x", weight(10_000, shared(6_000, 1_000)), "r").is_err());
        let err = check(
            "lines",
            weight(usize::MAX, shared(usize::MAX, usize::MAX)),
            "each field repeats its tags",
        )
        .unwrap_err();
        assert_eq!(err.field, "lines");
        assert!(err
            .reason
            .contains("MiB of events (each field repeats its tags)"));
        assert!(check("x", MAX_EXPANDED_BYTES, "r").is_ok());
        assert!(check("x", MAX_EXPANDED_BYTES + 1, "r").is_err());
    }
}
