//! The signing keys of access tokens (`control.signing_keys`): the newest unretired key signs,
//! every unretired key is published in the JWKS. Other instances pick up a rotation within
//! [`RELOAD_EVERY`].

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use shared::jwt::{self, Jwks, KeySource, Verifier};
use sqlx::PgPool;
use uuid::Uuid;

/// How often every instance re-reads the keys.
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct KeyRing {
    signing: Arc<RwLock<(String, Vec<u8>)>>,
    jwks: Arc<RwLock<Jwks>>,
    /// Verifies this instance's own tokens (logout-all, password change).
    pub verifier: Verifier,
}

impl KeyRing {
    /// Loads the keys, creating the first one if there is none.
    pub async fn load(pool: &PgPool) -> anyhow::Result<KeyRing> {
        ensure_key(pool).await?;
        let ring = KeyRing {
            signing: Arc::default(),
            jwks: Arc::default(),
            verifier: Verifier::new(KeySource::Static),
        };
        ring.reload(pool).await?;
        Ok(ring)
    }

    /// A ring with no keys yet, for tests of routes that sign nothing.
    #[cfg(test)]
    pub(crate) fn empty() -> KeyRing {
        KeyRing {
            signing: Arc::default(),
            jwks: Arc::default(),
            verifier: Verifier::new(KeySource::Static),
        }
    }

    pub async fn reload(&self, pool: &PgPool) -> anyhow::Result<()> {
        let rows: Vec<(String, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT kid, private_pkcs8, public_key FROM control.signing_keys
              WHERE retired_at IS NULL ORDER BY created_at DESC",
        )
        .fetch_all(pool)
        .await?;
        let (kid, private, _) = rows
            .first()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no signing key"))?;
        let jwks = Jwks {
            keys: rows.iter().map(|(k, _, p)| Jwks::ed25519(k, p)).collect(),
        };
        self.verifier.set_keys(&jwks);
        *self.jwks.write().expect("jwks lock") = jwks;
        *self.signing.write().expect("key lock") = (kid, private);
        Ok(())
    }

    /// Re-reads the keys every [`RELOAD_EVERY`] for as long as the process runs.
    pub fn reload_periodically(&self, pool: PgPool) {
        let ring = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = ring.reload(&pool).await {
                    tracing::warn!(error = %e, "reloading signing keys failed");
                }
            }
        });
    }

    pub fn jwks(&self) -> Jwks {
        self.jwks.read().expect("jwks lock").clone()
    }

    pub fn sign(&self, claims: &jwt::Claims) -> anyhow::Result<String> {
        let (kid, private) = self.signing.read().expect("key lock").clone();
        Ok(sign(&kid, &private, claims)?)
    }
}

/// A freshly generated Ed25519 key: its id, PKCS#8 private key and raw public key.
pub struct NewKey {
    pub kid: String,
    pub private_pkcs8: Vec<u8>,
    pub public_key: [u8; 32],
}

pub fn generate_key() -> NewKey {
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut seed);
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let der = key
        .to_pkcs8_der()
        .expect("an Ed25519 key always encodes as PKCS#8");
    NewKey {
        kid: format!("k{}", Uuid::now_v7().simple()),
        private_pkcs8: der.as_bytes().to_vec(),
        public_key: key.verifying_key().to_bytes(),
    }
}

/// Signs claims with a PKCS#8 Ed25519 key.
pub fn sign(
    kid: &str,
    private_pkcs8: &[u8],
    claims: &jwt::Claims,
) -> Result<String, jsonwebtoken::errors::Error> {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(private_pkcs8))
}

async fn ensure_key(pool: &PgPool) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tally.signing_keys'))")
        .execute(&mut *tx)
        .await?;
    let any: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM control.signing_keys WHERE retired_at IS NULL)",
    )
    .fetch_one(&mut *tx)
    .await?;
    if !any {
        insert_key(&mut tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn insert_key(conn: &mut sqlx::PgConnection) -> anyhow::Result<String> {
    let key = generate_key();
    sqlx::query(
        "INSERT INTO control.signing_keys (kid, private_pkcs8, public_key) VALUES ($1, $2, $3)",
    )
    .bind(&key.kid)
    .bind(&key.private_pkcs8)
    .bind(key.public_key.as_slice())
    .execute(conn)
    .await?;
    Ok(key.kid)
}

/// Starts signing with a new key; the previous key stays published (tokens it signed keep
/// working until they expire), older ones are retired.
pub async fn rotate(pool: &PgPool) -> anyhow::Result<String> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tally.signing_keys'))")
        .execute(&mut *tx)
        .await?;
    let kid = insert_key(&mut tx).await?;
    sqlx::query(
        "UPDATE control.signing_keys SET retired_at = now()
          WHERE retired_at IS NULL
            AND kid NOT IN (SELECT kid FROM control.signing_keys WHERE retired_at IS NULL
                             ORDER BY created_at DESC LIMIT 2)",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(kid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::jwt::{looks_like_jwt, Claims, Role};
    use shared::tenant::TenantId;

    #[tokio::test]
    async fn signed_tokens_verify_and_tampering_is_caught() {
        let key = generate_key();
        let v = Verifier::new(KeySource::Static);
        v.set_keys(&Jwks {
            keys: vec![Jwks::ed25519(&key.kid, &key.public_key)],
        });
        let claims = Claims::new(Uuid::now_v7(), TenantId::new(), Role::Developer, 0);
        let token = sign(&key.kid, &key.private_pkcs8, &claims).unwrap();
        assert!(looks_like_jwt(&token));
        assert_eq!(v.verify(&token).await.unwrap(), claims);

        let mut expired = claims.clone();
        expired.exp = chrono::Utc::now().timestamp() - 60;
        let t = sign(&key.kid, &key.private_pkcs8, &expired).unwrap();
        assert!(v.verify(&t).await.unwrap_err().detail.contains("expired"));

        let other = generate_key();
        let t = sign(&other.kid, &other.private_pkcs8, &claims).unwrap();
        assert!(v
            .verify(&t)
            .await
            .unwrap_err()
            .detail
            .contains("unknown signing key"));
        // Another key under a known kid: the signature does not match.
        let t = sign(&key.kid, &other.private_pkcs8, &claims).unwrap();
        assert!(v
            .verify(&t)
            .await
            .unwrap_err()
            .detail
            .contains("bad signature"));
    }
}
