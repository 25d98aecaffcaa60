//! API keys for machines: generated once by ingest-api, shown once, stored only as a SHA-256
//! hash.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Send events.
    Ingest,
    /// Read dashboards.
    Read,
    /// Manage the tenant's users and keys.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "ingest" => Some(Scope::Ingest),
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// Prefix of every key, so leaked keys are easy to spot by secret scanners.
pub const KEY_PREFIX: &str = "tly_";

/// The stored form of a key (or of any other secret ingest-api generates). They are long random
/// strings, so a plain SHA-256 is enough (no password stretching needed) and makes lookup by
/// hash a single index probe.
pub fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Prefix of platform-operator keys.
pub const OPERATOR_PREFIX: &str = "tlo_";

/// Whether a presented string looks like one of our keys at all (cheap pre-check).
pub fn looks_like_key(s: &str) -> bool {
    s.len() == KEY_PREFIX.len() + 64
        && s.starts_with(KEY_PREFIX)
        && s[KEY_PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_keys_look_like_keys() {
        assert!(looks_like_key(&format!("tly_{}", "0a".repeat(32))));
        assert!(!looks_like_key("tly_short"));
        assert!(!looks_like_key(&format!("xyz_{}", "a".repeat(64))));
        assert!(!looks_like_key(&format!("tly_{}", "g".repeat(64))));
    }
}
