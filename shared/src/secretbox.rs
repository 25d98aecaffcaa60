//! Secrets at rest (SSO client secrets, notification channels): XChaCha20-Poly1305 with the
//! services' shared `secret_key`.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// A 32-byte key given as 64 hex characters.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    pub fn from_hex(s: &str) -> Result<SecretKey, String> {
        let bytes = hex::decode(s.trim()).map_err(|_| "secret_key must be hex".to_string())?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "secret_key must be 32 bytes (64 hex characters)".to_string())?;
        Ok(SecretKey(key))
    }

    /// nonce (24 bytes) ‖ ciphertext+tag.
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let ct = cipher
            .encrypt(&XNonce::from(nonce), plaintext)
            .expect("encryption of a small secret cannot fail");
        [nonce.as_slice(), &ct].concat()
    }

    pub fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 24 {
            return None;
        }
        let (nonce, ct) = sealed.split_at(24);
        let nonce: [u8; 24] = nonce.try_into().ok()?;
        XChaCha20Poly1305::new((&self.0).into())
            .decrypt(&XNonce::from(nonce), ct)
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key() {
        let k = SecretKey::from_hex(&"11".repeat(32)).unwrap();
        let other = SecretKey::from_hex(&"22".repeat(32)).unwrap();
        let sealed = k.seal(b"client-secret");
        assert!(!sealed.windows(13).any(|w| w == b"client-secret"));
        assert_eq!(k.open(&sealed).as_deref(), Some(&b"client-secret"[..]));
        assert_eq!(other.open(&sealed), None);
        assert!(SecretKey::from_hex("abcd").is_err());
    }
}
