//! API keys for machines: generated once, shown once, stored only as a SHA-256 hash.

use rand::RngCore;
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

/// A freshly generated key: the secret (to show once) and its hash (to store).
pub struct NewKey {
    pub secret: String,
    pub hash: Vec<u8>,
}

/// Makes a new random API key with 256 bits of entropy.
pub fn generate() -> NewKey {
    generate_secret(KEY_PREFIX)
}

/// A random secret with 256 bits of entropy after `prefix` (keys, refresh tokens,
/// invitation links), and its stored hash.
pub fn generate_secret(prefix: &str) -> NewKey {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{prefix}{}", hex::encode(bytes));
    let hash = hash(&secret);
    NewKey { secret, hash }
}

/// The stored form of a key (or any secret from [`generate_secret`]). They are long random strings, so a plain SHA-256 is enough
/// (no password stretching needed) and makes lookup by hash a single index probe.
pub fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Prefix of platform-operator keys.
pub const OPERATOR_PREFIX: &str = "tlo_";

/// Makes a new operator key.
pub fn generate_operator() -> NewKey {
    generate_secret(OPERATOR_PREFIX)
}

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
    fn keys_are_unique_and_hash_stably() {
        let a = generate();
        let b = generate();
        assert_ne!(a.secret, b.secret);
        assert!(looks_like_key(&a.secret));
        assert_eq!(hash(&a.secret), a.hash);
        assert!(!looks_like_key("tly_short"));
        assert!(!looks_like_key(&format!("xyz_{}", "a".repeat(64))));
    }
}
