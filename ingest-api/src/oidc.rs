//! The OpenID Connect relying party: discovery, PKCE, and ID-token verification against the
//! issuer's JWKS (signature, `iss`, `aud`, `exp`, `nonce`).

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use shared::webhooks::Policy;

#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
}

/// The largest answer read from an identity provider (a discovery document, a JWKS, a token
/// response are a few KiB). The provider is the tenant's to choose, and `/v1/auth/sso/start`
/// answers anyone: without a bound, a provider answering gigabytes would have them held here.
pub const MAX_PROVIDER_ANSWER: usize = 256 * 1024;

/// `res`'s JSON, read no further than [`MAX_PROVIDER_ANSWER`] bytes.
pub async fn json_within<T: serde::de::DeserializeOwned>(
    mut res: reqwest::Response,
) -> Result<T, String> {
    if res
        .content_length()
        .is_some_and(|n| n > MAX_PROVIDER_ANSWER as u64)
    {
        return Err(format!("the answer is over {MAX_PROVIDER_ANSWER} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_PROVIDER_ANSWER {
            return Err(format!("the answer is over {MAX_PROVIDER_ANSWER} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// How identity providers are reached. The tenant chooses its provider, so the service goes
/// only where a notification may ([`Policy`]: HTTPS to public addresses unless the operator
/// allows loopback or private networks; never link-local, which holds cloud metadata): the
/// issuer and the endpoints its discovery names are checked, and every name is resolved
/// through the policy. No redirects, 5 s per request.
#[derive(Clone)]
pub struct Providers {
    pub http: reqwest::Client,
    pub policy: Policy,
}

impl Providers {
    pub fn new(policy: Policy) -> Providers {
        Providers {
            http: policy.client(Duration::from_secs(5)).expect("HTTP client"),
            policy,
        }
    }
}

/// Fetches the issuer's discovery document and checks it names the same issuer, and that
/// the issuer and the endpoints the service itself calls are places the policy allows.
pub async fn discover(p: &Providers, issuer: &str) -> Result<Discovery, String> {
    let issuer = issuer.trim_end_matches('/');
    p.policy
        .check_url(issuer)
        .map_err(|e| format!("the issuer {e}"))?;
    let url = format!("{issuer}/.well-known/openid-configuration");
    let res = p
        .http
        .get(&url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| format!("discovery at {url} failed: {e}"))?;
    let d: Discovery = json_within(res)
        .await
        .map_err(|e| format!("discovery at {url} is not valid: {e}"))?;
    if d.issuer.trim_end_matches('/') != issuer {
        return Err(format!(
            "discovery names issuer {} instead of {issuer}",
            d.issuer
        ));
    }
    for (what, url) in [
        ("jwks_uri", &d.jwks_uri),
        ("token_endpoint", &d.token_endpoint),
    ] {
        p.policy
            .check_url(url)
            .map_err(|e| format!("discovery's {what} {e}"))?;
    }
    Ok(d)
}

/// A random PKCE code verifier and its S256 challenge.
pub fn pkce() -> (String, String) {
    let verifier = random_token(48);
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// `n` random bytes, base64url.
pub fn random_token(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The claims Tally reads from an ID token.
#[derive(Debug, Clone, Deserialize)]
pub struct IdClaims {
    pub sub: String,
    pub email: Option<String>,
    /// Some providers send a boolean, some the string "true".
    pub email_verified: Option<serde_json::Value>,
    pub nonce: Option<String>,
}

/// The longest subject an identity may have: the control schema keys identities by it.
pub const MAX_SUBJECT_BYTES: usize = 255;

impl IdClaims {
    /// The address the provider vouches for, as an account holds it (trimmed, lower case,
    /// 3 to 254 characters with an `@` and no NUL); otherwise none.
    pub fn verified_email(&self) -> Option<String> {
        let verified = match &self.email_verified {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::String(s)) => s == "true",
            _ => false,
        };
        self.email
            .as_ref()
            .filter(|_| verified)
            .map(|e| e.trim().to_lowercase())
            .filter(|e| {
                (3..=254).contains(&e.chars().count()) && e.contains('@') && !e.contains('\0')
            })
    }
}

/// Verifies an ID token: an asymmetric signature by a key of the issuer's JWKS, the issuer,
/// our client id as audience, expiry, and the nonce this login was started with.
pub async fn verify_id_token(
    http: &reqwest::Client,
    d: &Discovery,
    client_id: &str,
    nonce: &str,
    token: &str,
) -> Result<IdClaims, String> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| "malformed ID token".to_string())?;
    let allowed = [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];
    if !allowed.contains(&header.alg) {
        return Err(format!(
            "ID token algorithm {:?} is not accepted",
            header.alg
        ));
    }
    let res = http
        .get(&d.jwks_uri)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| format!("issuer JWKS unavailable: {e}"))?;
    let jwks: JwkSet = json_within(res)
        .await
        .map_err(|e| format!("issuer JWKS is not valid: {e}"))?;
    let jwk = match &header.kid {
        Some(kid) => jwks.find(kid),
        None if jwks.keys.len() == 1 => jwks.keys.first(),
        None => None,
    }
    .ok_or_else(|| "ID token signed by a key the issuer does not publish".to_string())?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "unusable issuer key".to_string())?;
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[d.issuer.as_str()]);
    validation.set_audience(&[client_id]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.leeway = 30;
    let claims = jsonwebtoken::decode::<IdClaims>(token, &key, &validation)
        .map_err(|e| format!("ID token rejected: {e}"))?
        .claims;
    if claims.nonce.as_deref() != Some(nonce) {
        return Err("ID token nonce does not match this login".into());
    }
    // The identity is stored under its subject: one the control schema cannot key is refused
    // here (401) rather than failing the insert (503).
    if claims.sub.is_empty() || claims.sub.len() > MAX_SUBJECT_BYTES || claims.sub.contains('\0') {
        return Err(format!(
            "ID token subject is empty, over {MAX_SUBJECT_BYTES} bytes, or holds NUL"
        ));
    }
    Ok(claims)
}
