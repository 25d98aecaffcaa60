//! Access tokens for people: short-lived JWTs signed with Ed25519 (EdDSA) keys that carry a
//! `kid`. ingest-api signs them (`ingest_api::keys`) and publishes its keys at `/.well-known/jwks.json`; query-api
//! verifies them from that JWKS, so no secret is shared between the services.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::problem::Problem;
use crate::tenant::TenantId;

/// `iss` of every access token.
pub const ISSUER: &str = "tally";
/// `aud` of every access token.
pub const AUDIENCE: &str = "tally-api";
/// Lifetime of an access token.
pub const ACCESS_TTL: Duration = Duration::from_secs(15 * 60);

/// A person's role in their tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Admin,
    Manager,
    Developer,
    Viewer,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        serde_json::from_value(serde_json::Value::from(s)).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Manager => "manager",
            Role::Developer => "developer",
            Role::Viewer => "viewer",
        }
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The user's id.
    pub sub: Uuid,
    /// The user's tenant.
    pub tid: TenantId,
    pub role: Role,
    /// The user's token version when issued; a later version makes this token invalid.
    pub ver: i32,
    pub iat: i64,
    pub exp: i64,
    pub jti: Uuid,
}

impl Claims {
    pub fn new(user: Uuid, tenant: TenantId, role: Role, ver: i32) -> Claims {
        let now = chrono::Utc::now().timestamp();
        Claims {
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            sub: user,
            tid: tenant,
            role,
            ver,
            iat: now,
            exp: now + ACCESS_TTL.as_secs() as i64,
            jti: Uuid::now_v7(),
        }
    }
}

/// One public key of a JWKS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub kid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

/// A JSON Web Key Set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// The JWK of an Ed25519 public key.
    pub fn ed25519(kid: &str, public_key: &[u8]) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(public_key),
            kid: kid.into(),
            alg: Some("EdDSA".into()),
            use_: Some("sig".into()),
        }
    }
}

/// Where a verifier gets its keys.
#[derive(Clone)]
pub enum KeySource {
    /// A JWKS URL, fetched when a token names a `kid` not seen yet (at most every 5 s).
    Url(String),
    /// Keys handed over in-process (ingest-api verifies its own tokens).
    Static,
}

/// Verifies access tokens: EdDSA only, known `kid`, `iss`, `aud`, `exp`.
#[derive(Clone)]
pub struct Verifier {
    source: KeySource,
    keys: Arc<RwLock<HashMap<String, Vec<u8>>>>,
    last_fetch: Arc<tokio::sync::Mutex<Option<Instant>>>,
    http: reqwest::Client,
}

const REFETCH_EVERY: Duration = Duration::from_secs(5);

impl Verifier {
    pub fn new(source: KeySource) -> Verifier {
        Verifier {
            source,
            keys: Arc::default(),
            last_fetch: Arc::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .expect("HTTP client"),
        }
    }

    /// Replaces the known keys (for [`KeySource::Static`]).
    pub fn set_keys(&self, jwks: &Jwks) {
        let mut map = HashMap::new();
        for k in &jwks.keys {
            if k.kty == "OKP" && k.crv == "Ed25519" {
                if let Ok(x) = URL_SAFE_NO_PAD.decode(&k.x) {
                    if x.len() == 32 {
                        map.insert(k.kid.clone(), x);
                    }
                }
            }
        }
        *self.keys.write().expect("jwks lock") = map;
    }

    fn key(&self, kid: &str) -> Option<Vec<u8>> {
        self.keys.read().expect("jwks lock").get(kid).cloned()
    }

    async fn refetch(&self) {
        let KeySource::Url(url) = &self.source else {
            return;
        };
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < REFETCH_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        match self.http.get(url).send().await {
            Ok(res) => match res.json::<Jwks>().await {
                Ok(jwks) => self.set_keys(&jwks),
                Err(e) => tracing::warn!(error = %e, %url, "JWKS is not valid JSON"),
            },
            Err(e) => tracing::warn!(error = %e, %url, "JWKS fetch failed"),
        }
    }

    /// The token's claims, or a 401 problem saying what is wrong with it.
    pub async fn verify(&self, token: &str) -> Result<Claims, Problem> {
        let bad = |why: &str| Problem::unauthorized(format!("invalid access token: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|_| bad("malformed"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(bad("only EdDSA-signed tokens are accepted"));
        }
        let kid = header.kid.ok_or_else(|| bad("no key id (kid)"))?;
        let key = match self.key(&kid) {
            Some(k) => k,
            None => {
                self.refetch().await;
                self.key(&kid).ok_or_else(|| bad("unknown signing key"))?
            }
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        let key = DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(key))
            .map_err(|_| bad("unusable signing key"))?;
        jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map(|d| d.claims)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                bad(match e.kind() {
                    K::ExpiredSignature => "expired",
                    K::InvalidIssuer => "wrong issuer",
                    K::InvalidAudience => "wrong audience",
                    K::InvalidSignature => "bad signature",
                    K::InvalidAlgorithm => "wrong algorithm",
                    _ => "rejected",
                })
            })
    }
}

/// Whether a bearer credential looks like a JWT (three dot-separated parts) rather than an
/// API key.
pub fn looks_like_jwt(s: &str) -> bool {
    s.split('.').count() == 3 && !s.starts_with(crate::apikey::KEY_PREFIX)
}
