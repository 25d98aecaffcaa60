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
use crate::shed::{Busy, Charge, Shed};
use crate::state::AppState;
use flate2::read::GzDecoder;
use shared::ratelimit::Decision;

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

/// The key check, then the tenant's rate limit, then its share of the in-flight budget
/// ([`Shed::hold_share`]), then `handle` (given the headers back); the answer carries the
/// rate-limit headers.
pub async fn ingest_door<F, Fut>(s: &AppState, headers: HeaderMap, handle: F) -> Response
where
    F: FnOnce(KeyPrincipal, HeaderMap) -> Fut,
    Fut: std::future::Future<Output = Result<Response, IngestError>>,
{
    let (admitted, decision) = admit(s, &headers).await;
    let mut res = match admitted {
        // The tenant's share of the in-flight budget, held until it is answered.
        Ok(principal) => match s
            .shed
            .hold_share(principal.tenant_id, s.shed.declared(&headers))
        {
            Ok(_share) => handle(principal, headers)
                .await
                .unwrap_or_else(IntoResponse::into_response),
            Err(busy) => IngestError::from(busy).into_response(),
        },
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

/// A body as a door reads it: as sent, or inflated as far as the lane's size ([`Lane`]) with
/// the rest of its gzip stream still to inflate where it is worked on ([`ReadBody::work`]).
/// It holds the share of the in-flight byte budget ([`Shed::charge`]) that it took beyond
/// what its request was charged on arrival, so far as it has been inflated. Every door
/// reads its body this way, OTLP/gRPC included (`crate::grpc`); each says [`Unreadable`] in
/// its own terms.
pub struct ReadBody {
    content: Content,
    limit: usize,
    shed: Shed,
    /// Whose body it is: inflated bytes are charged to its share too.
    tenant: TenantId,
    /// The bytes charged for it so far: on arrival, then as inflated.
    charged: usize,
    held: Vec<Charge>,
}

enum Content {
    Whole(Bytes),
    Inflating(Vec<u8>, Box<GzDecoder<Cursor<Bytes>>>),
}

/// Why a body cannot be read.
#[derive(Debug)]
pub enum Unreadable {
    /// Over the limit (of this many bytes), as sent or inflated.
    TooLarge(usize),
    /// Compressed, but not valid gzip.
    BadGzip(std::io::Error),
    /// The in-flight budget cannot hold what it inflates to ([`Shed::charge`]).
    Busy(Busy),
}

impl From<Unreadable> for IngestError {
    fn from(e: Unreadable) -> IngestError {
        match e {
            Unreadable::TooLarge(limit) => IngestError::too_large(limit),
            Unreadable::BadGzip(e) => {
                IngestError::bad_request("bad-encoding", format!("invalid gzip body: {e}"))
            }
            Unreadable::Busy(busy) => busy.into(),
        }
    }
}

impl ReadBody {
    /// `sent`, inflated when `gzip` as far as the lane's size, within `limit` bytes, by
    /// `tenant`'s request charged `charged` bytes on arrival (and charged here for what it
    /// inflated to beyond them).
    pub fn new(
        sent: Bytes,
        gzip: bool,
        limit: usize,
        (lane, shed): (&Lane, &Shed),
        tenant: TenantId,
        charged: usize,
    ) -> Result<ReadBody, Unreadable> {
        let content = if gzip {
            let mut gzip = GzDecoder::new(Cursor::new(sent));
            let mut out = Vec::new();
            let here = lane.min_bytes().min(limit + 1);
            if inflate(&mut gzip, &mut out, here).map_err(Unreadable::BadGzip)? {
                Content::Whole(out.into())
            } else {
                Content::Inflating(out, Box::new(gzip))
            }
        } else {
            Content::Whole(sent)
        };
        let mut body = ReadBody {
            content,
            limit,
            shed: shed.clone(),
            tenant,
            charged,
            held: Vec::new(),
        };
        let size = body.size();
        if size > limit {
            return Err(Unreadable::TooLarge(limit));
        }
        body.charge(size)?;
        Ok(body)
    }

    /// The bytes read so far.
    fn size(&self) -> usize {
        match &self.content {
            Content::Whole(bytes) => bytes.len(),
            Content::Inflating(out, _) => out.len(),
        }
    }

    /// Whether it is worked on in the lane: when it is large, or still inflating.
    pub fn is_large(&self, lane: &Lane) -> bool {
        match &self.content {
            Content::Whole(bytes) => lane.takes(bytes.len()),
            Content::Inflating(..) => true,
        }
    }

    /// Charged for `size` bytes in all.
    fn charge(&mut self, size: usize) -> Result<(), Unreadable> {
        let more = self.shed.charge(self.tenant, self.charged, size);
        self.held.extend(more.map_err(Unreadable::Busy)?);
        self.charged = self.charged.max(size);
        Ok(())
    }

    /// The body inflated to its end (within the limit) and charged for it.
    pub fn finish(mut self) -> Result<ReadBody, Unreadable> {
        if let Content::Inflating(out, gzip) = &mut self.content {
            inflate(gzip, out, self.limit + 1).map_err(Unreadable::BadGzip)?;
            if out.len() > self.limit {
                return Err(Unreadable::TooLarge(self.limit));
            }
            let whole = Bytes::from(std::mem::take(out));
            self.content = Content::Whole(whole);
            self.charge(self.size())?;
        }
        Ok(self)
    }

    /// The whole body, once [`ReadBody::finish`]ed (what has been inflated so far before).
    pub fn bytes(&self) -> &[u8] {
        match &self.content {
            Content::Whole(bytes) => bytes,
            Content::Inflating(out, _) => out,
        }
    }

    /// `work`'s answer on the whole body: worked out here when it is small, or on the lane
    /// as one of `tenant`'s bodies when it is large. The body is let go of as soon as `work`
    /// is done.
    pub async fn work<T, F>(self, lane: &Lane, tenant: TenantId, work: F) -> Result<T, IngestError>
    where
        T: Send + 'static,
        F: FnOnce(&[u8]) -> Result<T, IngestError> + Send + 'static,
    {
        let large = self.is_large(lane);
        lane.run_if(large, tenant, move || work(self.finish()?.bytes()))
            .await
    }
}

/// Inflates `gzip` into `out` until the stream ends or `out` holds `upto` bytes; true when it
/// ended.
fn inflate(
    gzip: &mut GzDecoder<Cursor<Bytes>>,
    out: &mut Vec<u8>,
    upto: usize,
) -> std::io::Result<bool> {
    let want = upto.saturating_sub(out.len());
    let got = gzip.take(want as u64).read_to_end(out)?;
    Ok(got < want)
}

/// Reads the body within `max_body_bytes`, both as sent and after gzip decompression (which
/// goes on to the lane past the lane's size), and charges the in-flight budget for what it
/// inflated to.
pub async fn read_body(
    s: &AppState,
    tenant: TenantId,
    body: Body,
    headers: &HeaderMap,
) -> Result<ReadBody, IngestError> {
    let limit = s.config.max_body_bytes;
    let sent = read_limited(body, limit).await?;
    let gzip = match header_text(headers, header::CONTENT_ENCODING)
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "identity" | "" => false,
        "gzip" => true,
        other => {
            return Err(IngestError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-encoding",
                "Unsupported content encoding",
                format!("Content-Encoding `{other}` is not supported; use gzip or none"),
            ))
        }
    };
    let declared = s.shed.declared(headers);
    let body = ReadBody::new(sent, gzip, limit, (&s.lane, &s.shed), tenant, declared)?;
    Ok(body)
}
