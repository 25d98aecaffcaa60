//! The signing keys of access tokens (`control.signing_keys`): the newest unretired key signs,
//! every unretired key is published in the JWKS. Other instances pick up a rotation within
//! [`RELOAD_EVERY`].

use std::sync::{Arc, RwLock};
use std::time::Duration;

use shared::jwt::{self, Jwks, KeySource, Verifier};
use sqlx::PgPool;

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
        Ok(jwt::sign(&kid, &private, claims)?)
    }
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
    let key = jwt::generate_key();
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
