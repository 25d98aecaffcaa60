//! Passwords: a strength policy and argon2id hashing (run it off the async threads).

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};

use shared::events::FieldError;

/// 8..=128 characters with at least three of: lowercase, uppercase, digit, other.
pub fn check_policy(field: &str, password: &str) -> Result<(), FieldError> {
    let n = password.chars().count();
    if !(8..=128).contains(&n) {
        return Err(FieldError::new(field, "must be 8 to 128 characters long"));
    }
    let classes = [
        password.chars().any(|c| c.is_lowercase()),
        password.chars().any(|c| c.is_uppercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_alphanumeric()),
    ];
    if classes.iter().filter(|x| **x).count() < 3 {
        return Err(FieldError::new(
            field,
            "must mix at least three of: lowercase, uppercase, digits, symbols",
        ));
    }
    Ok(())
}

/// argon2id hash in PHC string form.
pub fn hash(password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
    let hash: PasswordHash = Argon2::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .expect("argon2 with default parameters hashes any input");
    hash.to_string()
}

/// Whether `password` matches the stored hash (false for a malformed hash).
pub fn verify(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_table() {
        for ok in ["Abcdefg1", "correct-Horse7", "ÄÖÜäöü12!"] {
            assert!(check_policy("password", ok).is_ok(), "{ok}");
        }
        for bad in [
            "Ab1!",
            "abcdefgh",
            "abcdefg1",
            "ABCDEFGH1",
            &"Aa1!".repeat(33),
        ] {
            assert!(check_policy("password", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashes_verify_and_differ() {
        let a = hash("Tally-pass-1");
        let b = hash("Tally-pass-1");
        assert_ne!(a, b, "salted");
        assert!(a.starts_with("$argon2id$"));
        assert!(verify("Tally-pass-1", &a));
        assert!(!verify("tally-pass-1", &a));
        assert!(!verify("x", "not a hash"));
    }
}
