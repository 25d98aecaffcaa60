//! Answers cached ([`crate::cache`]) under keys that hold the tenant's watermark, so that a
//! cached answer is served for as long as the projection has not moved, and never after.

use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shared::problem::Problem;
use shared::tenant::TenantId;

use super::encoding;
use super::scope::ReadScope;
use super::tenant::Freshness;
use crate::cache::Cache;

/// Where one answer is cached.
pub struct CachedAnswer {
    tenant: TenantId,
    key: String,
}

impl CachedAnswer {
    /// The place of the answer to `request_key` (the endpoint and its own parameters) for a
    /// reader of `scope` in `tenant`, whose projection is at `fresh` (`None`: no projection
    /// yet).
    pub fn new(
        tenant: TenantId,
        fresh: Option<&Freshness>,
        scope: &ReadScope,
        request_key: &str,
    ) -> CachedAnswer {
        let (version, seq) = fresh.map_or((0, 0), |f| (f.version, f.seq));
        CachedAnswer::at(tenant, (version, seq), scope, request_key)
    }

    /// The same at a watermark known without reading the projection (the announced one).
    pub fn at(
        tenant: TenantId,
        (version, seq): (i32, i64),
        scope: &ReadScope,
        request_key: &str,
    ) -> CachedAnswer {
        CachedAnswer {
            tenant,
            key: answer_key(tenant, version, seq, scope, request_key),
        }
    }

    /// Where it is cached.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The cached answer, if there is one (`x-cache: hit`).
    pub async fn get(&self, cache: &Cache) -> Option<Response> {
        let stored = cache.get(&self.key).await?;
        Some(self.hit(stored))
    }

    /// The answer cached here, `stored` as it was read from the cache (`x-cache: hit`); a
    /// refusal cached for being too large ([`TOO_LARGE`]) is refused again.
    pub fn hit(&self, stored: Vec<u8>) -> Response {
        if stored == TOO_LARGE {
            return encoding::answer_too_large().into_response();
        }
        self.response(stored, "hit")
    }

    /// Caches `answer`, packed ([`encoding::pack`]), and returns it (`x-cache: miss`). One
    /// over [`encoding::MAX_ANSWER`] is refused, written out no further; the refusal is what
    /// is cached ([`TOO_LARGE`]), so that asking again under the same watermark does not
    /// compute it again.
    pub async fn put<T: Serialize>(&self, cache: &Cache, answer: &T) -> Result<Response, Problem> {
        let Some(json) = encoding::to_json_within(answer, encoding::MAX_ANSWER)
            .map_err(|_| Problem::internal())?
        else {
            cache.put(&self.tenant, &self.key, TOO_LARGE).await;
            return Err(encoding::answer_too_large());
        };
        let stored = encoding::pack(json);
        cache.put(&self.tenant, &self.key, &stored).await;
        Ok(self.response(stored, "miss"))
    }

    /// The answer stored as `stored`, with its `ETag` ([`encoding::etag`]).
    fn response(&self, stored: Vec<u8>, cache: &'static str) -> Response {
        let tag = encoding::etag(&stored);
        let mut res = encoding::answer(stored, Some(tag));
        res.headers_mut()
            .insert("x-cache", axum::http::HeaderValue::from_static(cache));
        res
    }
}

/// What is cached for an answer refused as too large: neither JSON nor gzip.
const TOO_LARGE: &[u8] = b"\0answer-too-large";

/// `tally:a:<tenant>:v<projection version>:<watermark seq>:<digest>`, the digest being the
/// first 128 bits of the SHA-256 of the scope and the request: a key of 100 bytes whatever
/// the request's text (a filter of 60 KB made a key as long). (`tally:a:` since answers are
/// stored packed; a query-api before that kept plain JSON under `tally:q:`, and one before
/// the digest the scope and request as text: versions side by side never read each other's
/// answers.)
fn answer_key(
    tenant: TenantId,
    version: i32,
    seq: i64,
    scope: &ReadScope,
    request_key: &str,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(scope.as_str().as_bytes());
    h.update([0u8]);
    h.update(request_key.as_bytes());
    let digest = h.finalize();
    format!(
        "tally:a:{tenant}:v{version}:{seq}:{}",
        hex::encode(&digest[..16])
    )
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::auth::Visibility;
    use crate::range::TimeRange;

    #[test]
    fn a_cached_refusal_is_refused_again() {
        let range = TimeRange {
            from: Utc.timestamp_opt(60, 0).unwrap(),
            to: Utc.timestamp_opt(120, 0).unwrap(),
        };
        let scope = ReadScope::labelled(&Visibility::Tenant.cache_label(), &range);
        let at = CachedAnswer::at(TenantId::new(), (1, 1), &scope, "timeline");
        let refused = at.hit(TOO_LARGE.to_vec());
        assert_eq!(
            refused.status(),
            axum::http::StatusCode::UNPROCESSABLE_ENTITY
        );
        assert!(refused.headers().get("etag").is_none());
        let answered = at.hit(br#"{"a":1}"#.to_vec());
        assert_eq!(answered.status(), axum::http::StatusCode::OK);
        assert_eq!(answered.headers()["x-cache"], "hit");
    }

    #[test]
    fn answers_are_keyed_by_watermark_scope_and_request() {
        let tenant = TenantId::new();
        let range = TimeRange {
            from: Utc.timestamp_opt(60, 0).unwrap(),
            to: Utc.timestamp_opt(120, 0).unwrap(),
        };
        let scope = ReadScope::labelled(&Visibility::Tenant.cache_label(), &range);
        let key = answer_key(tenant, 2, 41, &scope, "overview");
        assert!(
            key.starts_with(&format!("tally:a:{tenant}:v2:41:")),
            "{key}"
        );
        assert_eq!(key, answer_key(tenant, 2, 41, &scope, "overview"));
        let other_range = TimeRange {
            from: range.from,
            to: Utc.timestamp_opt(180, 0).unwrap(),
        };
        let user = ReadScope::labelled(&Visibility::Own("u".into()).cache_label(), &range);
        for different in [
            answer_key(tenant, 3, 41, &scope, "overview"),
            answer_key(tenant, 2, 42, &scope, "overview"),
            answer_key(TenantId::new(), 2, 41, &scope, "overview"),
            answer_key(tenant, 2, 41, &user, "overview"),
            answer_key(
                tenant,
                2,
                41,
                &ReadScope::labelled(&Visibility::Tenant.cache_label(), &other_range),
                "overview",
            ),
            answer_key(tenant, 2, 41, &scope, "timeseries"),
        ] {
            assert_ne!(key, different);
        }
        let long = answer_key(tenant, 2, 41, &scope, &"x".repeat(60_000));
        assert_eq!(long.len(), key.len());
    }
}
