//! How large a request may become once it is turned into events. The foreign formats repeat
//! shared text in every event they make (OTLP a resource's attributes in each point, line
//! protocol a line's tags in each field's sample, remote write a series' labels in each
//! sample), so a small body can ask for gigabytes. Each decoder adds up what its events
//! would weigh, from what it has read, and asks [`check`] before it builds any.

use shared::events::FieldError;

/// Most a request may expand to, in bytes of events (about; JSON).
pub const MAX_EXPANDED_BYTES: usize = 64 * 1024 * 1024;

/// What one event weighs besides the text it repeats (its type, time, ids, value, the
/// envelope's fields), about.
pub const EVENT_OVERHEAD: usize = 256;

/// About how many bytes `events` events weigh when each repeats `shared` bytes of text.
pub fn weight(events: usize, shared: usize) -> usize {
    events.saturating_mul(shared.saturating_add(EVENT_OVERHEAD))
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
        assert!(check("x", weight(1000, 1000), "r").is_ok());
        let err = check(
            "lines",
            weight(usize::MAX, usize::MAX),
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
