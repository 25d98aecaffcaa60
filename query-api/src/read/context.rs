//! The read context: who reads (their credential, checked once) and what they asked (the
//! query, parsed once), reached by handlers as extractors, then the range and the answer
//! (scope, tenant transaction, cache) from there.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::response::Response;
use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::Serialize;
use shared::problem::Problem;

use super::cache::CachedAnswer;
use super::errors::{db_error, invalid, invalid_query};
use super::scope::ReadScope;
use super::tenant::{self, TenantRead};
use crate::auth::Reader;
use crate::config::Config;
use crate::range::TimeRange;
use crate::state::AppState;

/// The reader, from the request's credential (401 or 403 when it does not hold), counted
/// against their tenant's read rate limit (429 past it).
impl FromRequestParts<AppState> for Reader {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Reader, Problem> {
        let peer = shared::serve::Peer::of(&parts.extensions);
        let reader = s.auth.reader(&parts.headers, peer).await?;
        within_read_limit(s, &reader).await?;
        Ok(reader)
    }
}

/// Counts one read of `reader`'s tenant; 429 with `Retry-After` past the limit.
pub async fn within_read_limit(s: &AppState, reader: &Reader) -> Result<(), Problem> {
    let decision = s
        .limiter
        .check(reader.tenant, s.config.read_rate_limit_per_min)
        .await;
    if decision.allowed {
        Ok(())
    } else {
        Err(decision.problem())
    }
}

/// A reader who is one of the tenant's owners or admins (403 for anyone else).
pub struct Admin(pub Reader);

impl FromRequestParts<AppState> for Admin {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Admin, Problem> {
        let reader = Reader::from_request_parts(parts, s).await?;
        reader.require_admin()?;
        Ok(Admin(reader))
    }
}

/// The query parameters `P`, or a 400 saying why the query string is not them.
pub struct Params<P>(pub P);

impl<P: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<P> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Params<P>, Problem> {
        let Query(params) = Query::try_from_uri(&parts.uri).map_err(invalid_query)?;
        Ok(Params(params))
    }
}

/// Query parameters that name a time range: `range` (a preset), or `from` and `to`.
pub trait Ranged {
    /// `range`, `from` and `to`, as the request gave them.
    fn range_params(&self) -> (Option<&str>, Option<&str>, Option<&str>);
}

/// Implements [`Ranged`] for query parameter structs with `range`, `from` and `to` fields.
macro_rules! ranged {
    ($($params:ty),+ $(,)?) => {
        $(impl $crate::read::Ranged for $params {
            fn range_params(&self) -> (Option<&str>, Option<&str>, Option<&str>) {
                (self.range.as_deref(), self.from.as_deref(), self.to.as_deref())
            }
        })+
    };
}
pub(crate) use ranged;

/// The range `params` name, widened to whole minutes and at most `max_range_days` long, or a
/// 400 naming the parameter at fault.
pub fn parse_range(config: &Config, params: &impl Ranged) -> Result<TimeRange, Problem> {
    let (range, from, to) = params.range_params();
    TimeRange::parse(range, from, to, Utc::now(), config.max_range_days).map_err(invalid)
}

/// One dashboard read: the reader and their query parameters `P` (authenticated first, so an
/// anonymous caller learns nothing about the parameters).
pub struct Read<P> {
    state: AppState,
    pub reader: Reader,
    pub params: P,
}

impl<P: DeserializeOwned + Send> FromRequestParts<AppState> for Read<P> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Read<P>, Problem> {
        let reader = Reader::from_request_parts(parts, s).await?;
        let Params(params) = Params::from_request_parts(parts, s).await?;
        Ok(Read {
            state: s.clone(),
            reader,
            params,
        })
    }
}

impl<P> Read<P> {
    pub fn config(&self) -> &Config {
        &self.state.config
    }

    /// Privacy mode's cells when this reader sees only aggregates (see
    /// [`super::privacy::Cells`]).
    pub async fn cells(&self) -> Result<Option<super::privacy::Cells>, Problem> {
        super::privacy::Cells::of(&self.state.pool, &self.reader).await
    }

    /// `res`, after auditing this read of other people's data (see
    /// [`super::privacy::audited`]): `what` names the view, `whose` finds the people in it.
    pub async fn audited(
        &self,
        what: &str,
        res: Response,
        whose: impl Fn(&serde_json::Value) -> Vec<String>,
    ) -> Result<Response, Problem> {
        super::privacy::audited(&self.state, &self.reader, what, res, whose).await
    }

    /// The range the parameters name (see [`parse_range`]); for a reader held to
    /// aggregates, the whole UTC days of it that have ended ([`TimeRange::closed_days_if`]).
    pub fn range(&self) -> Result<TimeRange, Problem>
    where
        P: Ranged,
    {
        let closed = self.reader.aggregates_only().is_some();
        Ok(parse_range(&self.state.config, &self.params)?.closed_days_if(closed, Utc::now()))
    }

    /// The answer to this request over `range`: from the cache while the tenant's watermark
    /// has not moved, else computed by `compute` in the tenant's read transaction (`None`
    /// before the tenant has a projection) and cached. An answer is cached under the
    /// watermark read in the transaction that computed it, so it is never older than the
    /// projection. It is looked up first under the watermark the projector announced in Redis
    /// before committing (never behind the committed one; see [`shared::watermark`]), so a
    /// hit opens no PostgreSQL transaction. `request_key` names the endpoint and every
    /// parameter that changes its answer besides the range and the reader's visibility.
    ///
    /// A reader held to aggregates is not told whether the answer was cached (`x-cache`):
    /// a miss after a hit would say an event just arrived somewhere in the tenant.
    pub async fn answer<T, F, Fut>(
        &self,
        range: &TimeRange,
        request_key: &str,
        compute: F,
    ) -> Result<Response, Problem>
    where
        T: Serialize,
        F: FnOnce(Option<TenantRead>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Problem>>,
    {
        let mut res = self.cached_or(range, request_key, compute).await?;
        if self.reader.aggregates_only().is_some() {
            // And no validator: such a reader is told nothing but the answer itself.
            res.headers_mut().remove("x-cache");
            res.headers_mut().remove(axum::http::header::ETAG);
        }
        Ok(res)
    }

    async fn cached_or<T, F, Fut>(
        &self,
        range: &TimeRange,
        request_key: &str,
        compute: F,
    ) -> Result<Response, Problem>
    where
        T: Serialize,
        F: FnOnce(Option<TenantRead>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Problem>>,
    {
        let tenant = self.reader.tenant;
        let cache = &self.state.cache;
        let scope = ReadScope::new(&self.reader, range);
        // Under the watermark this process saw announced last, the answer is asked for in
        // the same round trip as the watermark announced now, and served if they are one.
        let at = |at| CachedAnswer::at(tenant, at, &scope, request_key);
        let (announced, looked_up) = cache.announced(&tenant, |w| at(w).key().to_owned()).await;
        match (announced, looked_up) {
            (Some(w), Some(Some(stored))) => return Ok(at(w).hit(stored)),
            (_, Some(_)) | (None, None) => {}
            (Some(w), None) => {
                if let Some(hit) = at(w).get(cache).await {
                    return Ok(hit);
                }
            }
        }
        let read = tenant::open(&self.state, tenant).await.map_err(db_error)?;
        let fresh = read.as_ref().map(|r| &r.fresh);
        let seen = fresh.map(|f| (f.version, f.seq));
        if let Some((version, seq)) = seen.filter(|&seen| announced < Some(seen)) {
            cache.raise(&tenant, version, seq).await;
        }
        let cached = CachedAnswer::new(tenant, fresh, &scope, request_key);
        // Under the announced watermark it was looked up already.
        if seen.is_none() || seen != announced {
            if let Some(hit) = cached.get(cache).await {
                return Ok(hit);
            }
        }
        let answer = compute(read).await?;
        cached.put(cache, &answer).await
    }
}

#[cfg(test)]
mod tests {
    use axum::body::{to_bytes, Body};
    use axum::http::{header, Request, StatusCode};
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::{json, Value};
    use shared::jwt::{Claims, Jwks, KeySource, Role, Verifier};
    use shared::tenant::TenantId;
    use tower::ServiceExt;
    use uuid::Uuid;

    use crate::state::AppState;
    use crate::App;

    /// Every route that reads a tenant's data.
    const READS: [&str; 10] = [
        "/v1/dashboard/overview",
        "/v1/dashboard/timeseries",
        "/v1/dashboard/top",
        "/v1/dashboard/sessions",
        "/v1/dashboard/metrics",
        "/v1/dashboard/productivity",
        "/v1/dashboard/teams",
        "/v1/dashboard/activity",
        "/v1/audit",
        "/v1/stream",
    ];

    /// An Ed25519 key as ingest-api holds one (query-api only verifies; these tests sign).
    struct TestKey {
        kid: String,
        private_pkcs8: Vec<u8>,
        public_key: [u8; 32],
    }

    fn test_key(seed: u8) -> TestKey {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let der = key
            .to_pkcs8_der()
            .expect("an Ed25519 key encodes as PKCS#8");
        TestKey {
            kid: format!("test-{seed}"),
            private_pkcs8: der.as_bytes().to_vec(),
            public_key: key.verifying_key().to_bytes(),
        }
    }

    fn sign(kid: &str, private_pkcs8: &[u8], claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        let key = EncodingKey::from_ed_der(private_pkcs8);
        jsonwebtoken::encode(&header, claims, &key).expect("signs")
    }

    /// A state without database or Redis whose verifier knows one signing key, and that key.
    fn state() -> (AppState, TestKey) {
        let key = test_key(1);
        let verifier = Verifier::new(KeySource::Static);
        verifier.set_keys(&Jwks {
            keys: vec![Jwks::ed25519(&key.kid, &key.public_key)],
        });
        (AppState::unconnected(verifier), key)
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    /// `GET uri` with `authorization`; the answer must be a problem.
    async fn get(state: &AppState, uri: &str, authorization: Option<&str>) -> (StatusCode, Value) {
        let mut request = Request::get(uri);
        if let Some(a) = authorization {
            request = request.header(header::AUTHORIZATION, a);
        }
        let res = App::router(state.clone())
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = res.status();
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json",
            "{uri}"
        );
        let body = to_bytes(res.into_body(), 1 << 20).await.expect("body");
        (status, serde_json::from_slice(&body).expect("JSON problem"))
    }

    #[tokio::test]
    async fn reads_refuse_a_missing_or_forged_credential_before_looking_at_anything_else() {
        let (state, key) = state();
        let claims = Claims::new(Uuid::now_v7(), TenantId::new(), Role::Owner, 0);
        let stranger = test_key(2);
        let sign = |kid: &str, private: &[u8]| sign(kid, private, &claims);
        let b64 = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        // The same claims with a MAC anyone can compute, and with no signature at all.
        let hs256 = format!(
            "{}.{}.c2lnbmF0dXJl",
            b64(json!({"alg": "HS256", "typ": "JWT", "kid": key.kid})),
            b64(json!(claims))
        );
        let unsigned = format!(
            "{}.{}.",
            b64(json!({"alg": "none", "kid": key.kid})),
            b64(json!(claims))
        );
        let credentials = [
            None,
            Some("Bearer not-a-key".to_string()),
            Some(bearer(&sign(&stranger.kid, &stranger.private_pkcs8))),
            Some(bearer(&sign(&key.kid, &stranger.private_pkcs8))),
            Some(bearer(&hs256)),
            Some(bearer(&unsigned)),
        ];
        for route in READS {
            for credential in &credentials {
                // Parameters that are wrong too: the credential is what the caller hears about.
                let uri = format!("{route}?range=2y&limit=x");
                let (status, body) = get(&state, &uri, credential.as_deref()).await;
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "{route} {credential:?}: {body}"
                );
            }
        }
    }

    #[tokio::test]
    async fn parameters_are_checked_after_the_credential_in_each_endpoints_order() {
        let (state, key) = state();
        let tenant = TenantId::new();
        let token = |role: Role| {
            let user = Uuid::now_v7();
            state.auth.remember_member(user, tenant, role);
            let claims = Claims::new(user, tenant, role, 0);
            bearer(&sign(&key.kid, &key.private_pkcs8, &claims))
        };
        let (viewer, admin) = (token(Role::Viewer), token(Role::Admin));
        let cases = [
            (
                "/v1/dashboard/overview?range=2y",
                &viewer,
                400,
                Some("range"),
            ),
            (
                "/v1/dashboard/overview?from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z",
                &viewer,
                400,
                Some("to"),
            ),
            (
                "/v1/dashboard/overview?to=2026-11-01T00:00:00Z",
                &viewer,
                400,
                Some("from"),
            ),
            ("/v1/dashboard/timeseries?limit=x", &viewer, 400, None),
            (
                "/v1/dashboard/timeseries?bucket=1m&range=30d",
                &viewer,
                400,
                Some("bucket"),
            ),
            (
                "/v1/dashboard/top?format=xml&range=2y",
                &viewer,
                400,
                Some("format"),
            ),
            (
                "/v1/dashboard/sessions?format=xml&range=2y",
                &viewer,
                400,
                Some("range"),
            ),
            ("/v1/dashboard/metrics?range=1h", &viewer, 400, Some("name")),
            ("/v1/dashboard/teams?limit=0", &viewer, 400, Some("limit")),
            (
                "/v1/dashboard/activity?cursor=garbage",
                &viewer,
                400,
                Some("cursor"),
            ),
            ("/v1/audit?limit=x", &viewer, 403, None),
            ("/v1/audit?limit=x", &admin, 400, None),
            ("/v1/audit?range=2y", &admin, 400, Some("range")),
        ];
        for (uri, credential, status, field) in cases {
            let (got, body) = get(&state, uri, Some(credential)).await;
            assert_eq!(got.as_u16(), status, "{uri}: {body}");
            assert_eq!(body["errors"][0]["field"].as_str(), field, "{uri}: {body}");
            if status == 400 && field.is_none() {
                assert!(
                    body["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("Failed to deserialize query string")),
                    "{uri}: {body}"
                );
            }
        }
    }
}
