//! The random secrets the write side hands out once and stores only as a hash
//! ([`shared::apikey::hash`]): API keys, operator keys, refresh tokens, invitation links.

use rand::RngCore;
use shared::apikey::{hash, KEY_PREFIX, OPERATOR_PREFIX};

/// A freshly generated secret (to show once) and its hash (to store).
pub struct NewSecret {
    pub secret: String,
    pub hash: Vec<u8>,
}

/// A new random API key.
pub fn api_key() -> NewSecret {
    generate(KEY_PREFIX)
}

/// A new platform-operator key.
pub fn operator_key() -> NewSecret {
    generate(OPERATOR_PREFIX)
}

/// A random secret with 256 bits of entropy after `prefix`, and its stored hash.
pub fn generate(prefix: &str) -> NewSecret {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{prefix}{}", hex::encode(bytes));
    let hash = hash(&secret);
    NewSecret { secret, hash }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_hash_stably() {
        let (a, b) = (api_key(), api_key());
        assert_ne!(a.secret, b.secret);
        assert_eq!(hash(&a.secret), a.hash);
        assert!(shared::apikey::looks_like_key(&a.secret));
        assert!(operator_key().secret.starts_with(OPERATOR_PREFIX));
    }
}
