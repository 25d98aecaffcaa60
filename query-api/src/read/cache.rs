//! Answers cached ([`crate::cache`]) under keys that hold the tenant's watermark, so that a
//! cached answer is served for as long as the projection has not moved, and never after.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shared::problem::Problem;
use shared::tenant::TenantId;

use super::scope::ReadScope;
use super::tenant::Freshness;
use crate::cache::Cache;

/// Where one answer is cached.
pub struct CachedAnswer {
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
            key: answer_key(tenant, version, seq, scope, request_key),
        }
    }

    /// Where it is cached.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The cached answer, if there is one (`x-cache: hit`).
    pub async fn get(&self, cache: &Cache) -> Option<Response> {
        let body = cache.get(&self.key).await?;
        Some(CachedAnswer::hit(body))
    }

    /// A cached answer's `body` as the answer (`x-cache: hit`).
    pub fn hit(body: Vec<u8>) -> Response {
        json_response(body, "hit")
    }

    /// Caches `answer` and returns it (`x-cache: miss`).
    pub async fn put<T: Serialize>(&self, cache: &Cache, answer: &T) -> Result<Response, Problem> {
        let body = serde_json::to_vec(answer).map_err(|_| Problem::internal())?;
        cache.put(&self.key, &body).await;
        Ok(json_response(body, "miss"))
    }
}

/// `tally:q:<tenant>:v<projection version>:<watermark seq>:<scope>:<request>`.
fn answer_key(
    tenant: TenantId,
    version: i32,
    seq: i64,
    scope: &ReadScope,
    request_key: &str,
) -> String {
    format!(
        "tally:q:{tenant}:v{version}:{seq}:{}:{request_key}",
        scope.as_str()
    )
}

fn json_response(body: Vec<u8>, cache: &'static str) -> Response {
    let mut res = (StatusCode::OK, body).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert("x-cache", HeaderValue::from_static(cache));
    res
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::auth::Visibility;
    use crate::range::TimeRange;

    #[test]
    fn answers_are_keyed_by_watermark_scope_and_request() {
        let tenant = TenantId::new();
        let range = TimeRange {
            from: Utc.timestamp_opt(60, 0).unwrap(),
            to: Utc.timestamp_opt(120, 0).unwrap(),
        };
        let scope = ReadScope::labelled(&Visibility::Tenant.cache_label(), &range);
        assert_eq!(
            answer_key(tenant, 2, 41, &scope, "overview"),
            format!("tally:q:{tenant}:v2:41:all:60:120:overview")
        );
    }
}
