//! What every ingest door does around its own decoding: the key (scope `ingest`), the tenant's
//! rate limit, reading the body within its limit (gzip undone), and stamping with the key's
//! tenant.

use std::io::{Cursor, Read};

use axum::body::{to_bytes, Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::future::BoxFuture;
use shared::apikey::Scope;
use shared::auth::{ApiKeyStore, KeyError, KeyPrincipal};
use shared::events::{Actor, Source};
use shared::tenant::TenantId;

use crate::error::IngestError;
use crate::ingest::lane::Lane;
use crate::ingest::{Ids, IngestContext, Keep, Stamped, TimeBounds};
use crate::shed::Shed;
use crate::state::AppState;
use flate2::read::GzDecoder;
use shared::ratelimit::Decision;
use tokio::sync::OwnedSemaphorePermit;

/// Who a request's API key belongs to.
///
/// Contract: `authenticate` answers with the key's principal when the request presents a key
/// of `scope`, and otherwise says why not ([`KeyError`]).
pub trait Keys: Send + Sync + 'static {
    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
        scope: Scope,
    ) -> BoxFuture<'a, Result<KeyPrincipal, KeyError>>;
}

impl Keys for ApiKeyStore {
    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
        scope: Scope,
    ) -> BoxFuture<'a, Result<KeyPrincipal, KeyError>> {
        Box::pin(ApiKeyStore::authenticate(self, headers, scope))
    }
}

/// The key check, then the tenant's rate limit, then `handle` (given the headers back); the
/// answer carries the rate-limit headers.
pub async fn ingest_door<F, Fut>(s: &AppState, headers: HeaderMap, handle: F) -> Response
where
    F: FnOnce(KeyPrincipal, HeaderMap) -> Fut,
    Fut: std::future::Future<Output = Result<Response, IngestError>>,
{
    let (admitted, decision) = admit(s, &headers).await;
    let mut res = match admitted {
        Ok(principal) => handle(principal, headers)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Err(error) => error.into_response(),
    };
    if let Some(decision) = decision {
        decision.write_headers(res.headers_mut());
    }
    res
}

/// The key check and the tenant's rate limit, with the limiter's decision when it was asked.
pub async fn admit(
    s: &AppState,
    headers: &HeaderMap,
) -> (Result<KeyPrincipal, IngestError>, Option<Decision>) {
    let principal = match s.keys.authenticate(headers, Scope::Ingest).await {
        Ok(p) => p,
        Err(e) => return (Err(e.into()), None),
    };
    let decision = s
        .limiter
        .check(principal.tenant_id, principal.rate_limit_per_min)
        .await;
    if decision.allowed {
        (Ok(principal), Some(decision))
    } else {
        (Err(IngestError::RateLimited(decision)), Some(decision))
    }
}

/// How events sent with an API key are stamped and bounded: the key's tenant and id, now,
/// and the tenant's retention window. Events of the foreign formats, which carry no ids, get
/// ids derived from their content.
pub fn key_context(s: &AppState, principal: &KeyPrincipal, source: Source) -> IngestContext {
    IngestContext {
        tenant_id: principal.tenant_id,
        actor: Actor {
            user_id: None,
            api_key_id: Some(principal.key_id),
        },
        source,
        received_at: Utc::now(),
        bounds: TimeBounds {
            max_future_skew: chrono::Duration::seconds(s.config.max_future_skew_secs),
            retention: chrono::Duration::days(
                principal.raw_retention_days.min(s.config.retention_days),
            ),
        },
        ids: match source {
            Source::Otlp | Source::PromRw | Source::Influx => Ids::Content,
            _ => Ids::Fresh,
        },
    }
}

/// Appends the envelopes through the state's sink (which lets go of them once they are
/// written) and counts them under `source` (the `ingest_events_total` label); an empty batch
/// sends nothing.
pub async fn append(
    s: &AppState,
    envelopes: Vec<Stamped>,
    source: &'static str,
) -> Result<(), IngestError> {
    let n = envelopes.len() as u64;
    if n == 0 {
        return Ok(());
    }
    s.sink.send(envelopes).await?;
    metrics::counter!("ingest_events_total", "source" => source).increment(n);
    Ok(())
}

/// What the key's tenant keeps of the text its events carry.
pub fn keep(principal: &KeyPrincipal) -> Keep {
    Keep {
        prompts: principal.store_prompt_text,
        commands: principal.store_command_text,
    }
}

/// A request header as text (empty when absent or not visible ASCII).
pub fn header_text(headers: &HeaderMap, name: header::HeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Reads the body as sent, within `limit` bytes (413 beyond; a broken connection is a 400).
pub async fn read_limited(body: Body, limit: usize) -> Result<Bytes, IngestError> {
    // A declared length over the limit is refused before anything is read.
    if http_body::Body::size_hint(&body).lower() > limit as u64 {
        return Err(IngestError::too_large(limit));
    }
    to_bytes(body, limit).await.map_err(|e| {
        // `to_bytes` fails only for the length limit or a broken connection.
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit")
        {
            IngestError::too_large(limit)
        } else {
            IngestError::bad_request("body", format!("could not read the body: {e}"))
        }
    })
}

/// A body as a door reads it. A gzip body is inflated as it is read up to the lane's size
/// ([`Lane`]); one that inflates further is finished where it is worked on
/// ([`ReadBody::work`]). It holds the share of the in-flight byte budget that its
/// decompression took beyond its declared length ([`Shed::charge`]), so far as it has gone.
pub struct ReadBody {
    bytes: Vec<u8>,
    /// What is left to inflate.
    rest: Option<GzDecoder<Cursor<Bytes>>>,
    limit: usize,
    declared: usize,
    shed: Shed,
    _charge: Option<OwnedSemaphorePermit>,
}

impl ReadBody {
    /// `work`'s answer on the whole body: worked out here when it is small, or on the lane
    /// as one of `tenant`'s bodies when it is large. The body is let go of as soon as `work`
    /// is done.
    pub async fn work<T, F>(self, lane: &Lane, tenant: TenantId, work: F) -> Result<T, IngestError>
    where
        T: Send + 'static,
        F: FnOnce(&[u8]) -> Result<T, IngestError> + Send + 'static,
    {
        let large = self.rest.is_some() || lane.takes(self.bytes.len());
        lane.run_if(large, tenant, move || work(&self.finish()?.bytes))
            .await
    }

    /// The body inflated to its end (within the limit) and charged for what it inflated to
    /// beyond what was charged already.
    fn finish(mut self) -> Result<ReadBody, IngestError> {
        if let Some(mut rest) = self.rest.take() {
            let charged = self.declared.max(self.bytes.len());
            inflate(&mut rest, &mut self.bytes, self.limit + 1).map_err(bad_gzip)?;
            if self.bytes.len() > self.limit {
                return Err(IngestError::too_large(self.limit));
            }
            if let Some(more) = self.shed.charge(charged, self.bytes.len())? {
                match &mut self._charge {
                    Some(held) => held.merge(more),
                    None => self._charge = Some(more),
                }
            }
        }
        Ok(self)
    }
}

/// Inflates `gzip` into `out` until the stream ends or `out` holds `upto` bytes; true when it
/// ended.
pub(crate) fn inflate(
    gzip: &mut GzDecoder<Cursor<Bytes>>,
    out: &mut Vec<u8>,
    upto: usize,
) -> std::io::Result<bool> {
    let want = upto.saturating_sub(out.len());
    let got = gzip.take(want as u64).read_to_end(out)?;
    Ok(got < want)
}

/// A gzip body that is not.
fn bad_gzip(e: std::io::Error) -> IngestError {
    IngestError::bad_request("bad-encoding", format!("invalid gzip body: {e}"))
}

/// Reads the body within `max_body_bytes`, both as sent and after gzip decompression (which
/// goes on to the lane past the lane's size), and charges the in-flight budget for what it
/// inflated to.
pub async fn read_body(
    s: &AppState,
    body: Body,
    headers: &HeaderMap,
) -> Result<ReadBody, IngestError> {
    let limit = s.config.max_body_bytes;
    let sent = read_limited(body, limit).await?;
    let encoding = header_text(headers, header::CONTENT_ENCODING)
        .trim()
        .to_ascii_lowercase();
    let mut body = ReadBody {
        bytes: Vec::new(),
        rest: None,
        limit,
        declared: s.shed.declared(headers),
        shed: s.shed.clone(),
        _charge: None,
    };
    match encoding.as_str() {
        "identity" | "" => body.bytes = sent.into(),
        "gzip" => {
            let mut gzip = GzDecoder::new(Cursor::new(sent));
            let here = s.lane.min_bytes().min(limit + 1);
            if !inflate(&mut gzip, &mut body.bytes, here).map_err(bad_gzip)? {
                body.rest = Some(gzip);
            }
            if body.bytes.len() > limit {
                return Err(IngestError::too_large(limit));
            }
        }
        other => {
            return Err(IngestError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-encoding",
                "Unsupported content encoding",
                format!("Content-Encoding `{other}` is not supported; use gzip or none"),
            ))
        }
    }
    body._charge = s.shed.charge(body.declared, body.bytes.len())?;
    Ok(body)
}
