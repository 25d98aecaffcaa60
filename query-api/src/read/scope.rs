//! Who reads which range: part of every cached answer's key, so that an answer computed for
//! one caller's visibility is never served to another.

use crate::auth::Reader;
#[cfg(test)]
use crate::auth::Visibility;
use crate::range::TimeRange;

/// A reader's visibility and the range read, as a cache-key part.
pub struct ReadScope(String);

impl ReadScope {
    pub fn new(reader: &Reader, range: &TimeRange) -> ReadScope {
        ReadScope::labelled(&reader.cache_label(), range)
    }

    /// The scope of readers with the cache label `label` ([`Reader::cache_label`]).
    pub fn labelled(label: &str, range: &TimeRange) -> ReadScope {
        ReadScope(format!(
            "{}:{}:{}",
            label,
            range.from.timestamp(),
            range.to.timestamp()
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    #[test]
    fn readers_who_see_other_rows_get_other_scopes() {
        let range = TimeRange {
            from: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
            to: Utc.with_ymd_and_hms(2026, 11, 2, 0, 0, 0).unwrap(),
        };
        let scope = |v: Visibility| {
            ReadScope::labelled(&v.cache_label(), &range)
                .as_str()
                .to_string()
        };
        assert_eq!(scope(Visibility::Tenant), "all:1793491200:1793577600");
        assert_eq!(
            scope(Visibility::Teams(vec!["a".into(), "b".into()])),
            "teams=[\"a\",\"b\"]:1793491200:1793577600"
        );
        assert_eq!(
            scope(Visibility::Own("u".into())),
            "user=\"u\":1793491200:1793577600"
        );
    }
}
