//! What every ingest door does around its own decoding: the key (scope `ingest`), the tenant's
//! rate limit, reading the body within its limit (gzip undone), and stamping with the key's
//! tenant.

use std::io::{Cursor, Read};
use std::net::IpAddr;

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use shared::apikey::Scope;
use shared::auth::{ApiKeyStore, KeyError, KeyPrincipal};
use shared::events::{Actor, Source};
use shared::tenant::TenantId;

use crate::error::IngestError;
use crate::ingest::lane::Lane;
use crate::ingest::sink::Batch;
use crate::ingest::{Ids, IngestContext, Keep, TimeBounds};
use crate::shed::{Busy, Charges};
use crate::state::AppState;
use flate2::read::GzDecoder;
use shared::ratelimit::Decision;

/// Who a request's API key belongs to.
///
/// Contract: `authenticate` answers with the key's principal when the request presents a key
/// of `scope`, and otherwise says why not ([`KeyError`]).
pub trait Keys: Send + Sync + 'static {
    /// The request's key, sent from `peer`, if it carries `scope`.
    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
        scope: Scope,
        peer: Option<IpAddr>,
    ) -> BoxFuture<'a, Result<KeyPrincipal, KeyError>>;
}

impl Keys for ApiKeyStore {
    fn authenticate<'a>(
        &'a self,
        headers: &'a HeaderMap,
        scope: Scope,
        peer: Option<IpAddr>,
    ) -> BoxFuture<'a, Result<KeyPrincipal, KeyError>> {
        Box::pin(ApiKeyStore::authenticate(self, headers, scope, peer))
    }
}

/// The key check, then the tenant's rate limit, then its request's hold on the in-flight
/// budget (`Shed::hold`, until it is answered), then `handle` (given the headers back); the
/// answer carries the rate-limit headers. `peer` is where the request came from.
pub async fn ingest_door<F, Fut>(
    s: &AppState,
    headers: HeaderMap,
    peer: Option<IpAddr>,
    handle: F,
) -> Response
where
    F: FnOnce(KeyPrincipal, HeaderMap) -> Fut,
    Fut: std::future::Future<Output = Result<Response, IngestError>>,
{
    let (admitted, decision) = admit(s, &headers, peer).await;
    let held = admitted.and_then(|principal| {
        let held = s
            .shed
            .hold(principal.tenant_id, s.shed.declared(&headers))?;
        Ok((principal, held))
    });
    let mut res = match held {
        Ok((principal, _held)) => handle(principal, headers)
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
    peer: Option<IpAddr>,
) -> (Result<KeyPrincipal, IngestError>, Option<Decision>) {
    let principal = match s.keys.authenticate(headers, Scope::Ingest, peer).await {
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

/// Appends the batch through the state's sink (which lets go of it once it is written) and
/// counts its events under `source` (the `ingest_events_total` label); an empty batch sends
/// nothing.
pub async fn append(s: &AppState, batch: Batch, source: &'static str) -> Result<(), IngestError> {
    let n = batch.len() as u64;
    if n == 0 {
        return Ok(());
    }
    s.sink.send(batch).await?;
    metrics::counter!("ingest_events_total", "source" => source).increment(n);
    Ok(())
}

/// [`append`]s the events of `principal`'s request once they are counted against its tenant's
/// events a minute: past it, none is appended and the request is a 429 with `Retry-After`
/// (the requests limit alone let a request of 50 000 points count as one). A request of more
/// events than the whole minute allows is a 413, not counted: no retry would ever pass.
pub async fn append_counted(
    s: &AppState,
    principal: &KeyPrincipal,
    batch: Batch,
    source: &'static str,
) -> Result<(), IngestError> {
    if batch.is_empty() {
        return Ok(());
    }
    if batch.len() as u64 > u64::from(principal.events_per_min) {
        return Err(IngestError::too_many(shared::events::FieldError::new(
            "body",
            format!(
                "{} events; this tenant may send {} a minute: split the request",
                batch.len(),
                principal.events_per_min
            ),
        )));
    }
    let decision = s
        .event_limiter
        .check_n(
            principal.tenant_id,
            principal.events_per_min,
            batch.len() as u64,
        )
        .await;
    if !decision.allowed {
        return Err(IngestError::RateLimited(decision));
    }
    append(s, batch, source).await
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

/// Reads the body as sent, within `limit` bytes and `within` (the time a body may take to
/// arrive), charging what it comes to as it arrives.
pub async fn read_limited<B>(
    body: B,
    limit: usize,
    charges: &mut Charges,
    within: Duration,
) -> Result<Bytes, Unreadable>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    // A declared length over the limit is refused before anything is read.
    if body.size_hint().lower() > limit as u64 {
        return Err(Unreadable::TooLarge(limit));
    }
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut pieces: Vec<Bytes> = Vec::new();
        let mut size = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Unreadable::Broken(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            size += data.len();
            if size > limit {
                return Err(Unreadable::TooLarge(limit));
            }
            charges.up_to(size).map_err(Unreadable::Busy)?;
            pieces.push(data);
        }
        // A body that came in one piece is kept as it came; one of several is copied once,
        // into exactly its size.
        Ok(match pieces.len() {
            0 => Bytes::new(),
            1 => pieces.swap_remove(0),
            _ => {
                let mut whole = Vec::with_capacity(size);
                for piece in &pieces {
                    whole.extend_from_slice(piece);
                }
                whole.into()
            }
        })
    };
    match tokio::time::timeout(within, read).await {
        Ok(read) => read,
        Err(_) => {
            metrics::counter!("ingest_body_timeouts_total").increment(1);
            Err(Unreadable::Slow(within))
        }
    }
}

/// A body as a door reads it: as sent, or inflated as far as the lane's size ([`Lane`]) with
/// the rest of its gzip stream still to inflate where it is worked on ([`ReadBody::work`]).
/// It holds the share of the in-flight byte budget ([`Charges`]) that it took beyond
/// what its request was charged on arrival, so far as it has been inflated. Every door
/// reads its body this way, OTLP/gRPC included (`crate::grpc`); each says [`Unreadable`] in
/// its own terms.
pub struct ReadBody {
    content: Content,
    limit: usize,
    /// What it holds of the in-flight budget beyond its request's arrival.
    charges: Charges,
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
    /// The in-flight budget cannot hold it as it arrives or inflates ([`Charges`]).
    Busy(Busy),
    /// The connection broke (or the body was not what it declared) while it was read.
    Broken(String),
    /// It had not all arrived within this time.
    Slow(Duration),
}

impl From<Unreadable> for IngestError {
    fn from(e: Unreadable) -> IngestError {
        match e {
            Unreadable::TooLarge(limit) => IngestError::too_large(limit),
            Unreadable::BadGzip(e) => {
                IngestError::bad_request("bad-encoding", format!("invalid gzip body: {e}"))
            }
            Unreadable::Busy(busy) => busy.into(),
            Unreadable::Broken(e) => {
                IngestError::bad_request("body", format!("could not read the body: {e}"))
            }
            Unreadable::Slow(within) => IngestError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body-timeout",
                "Request timeout",
                format!("the body had not all arrived after {} s", within.as_secs()),
            ),
        }
    }
}

impl ReadBody {
    /// `sent`, inflated when `gzip` as far as the lane's size, within `limit` bytes, holding
    /// `charges` (what it was charged as it was read) and charged there for what it inflated
    /// to.
    pub fn new(
        sent: Bytes,
        gzip: bool,
        limit: usize,
        lane: &Lane,
        charges: Charges,
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
            charges,
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
        self.charges.up_to(size).map_err(Unreadable::Busy)
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

    /// What it holds of the budget, the body itself let go of.
    pub fn into_charges(self) -> Charges {
        self.charges
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
    let mut charges = Charges::new(&s.shed, tenant, s.shed.declared(headers));
    let sent = read_limited(body, limit, &mut charges, s.body_timeout()).await?;
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
    Ok(ReadBody::new(sent, gzip, limit, &s.lane, charges)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shed::{Limits, Shed};
    use http_body::Frame;
    use http_body_util::StreamBody;

    type Sent = Result<Frame<Bytes>, std::io::Error>;

    /// A body whose frames are sent on the returned channel; it ends when the channel does.
    fn streamed() -> (
        futures::channel::mpsc::UnboundedSender<Sent>,
        StreamBody<futures::channel::mpsc::UnboundedReceiver<Sent>>,
    ) {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        (tx, StreamBody::new(rx))
    }

    fn shed() -> Shed {
        Shed::new(Limits {
            requests: 8,
            bytes: 1000,
            tenant_requests: 8,
            tenant_bytes: 1000,
            max_body: 100,
        })
    }

    /// A body in several frames is read whole (trailers skipped) and, sent without a length,
    /// charged for what it came to as it came; the charge goes with the charges.
    #[tokio::test]
    async fn a_body_of_several_frames_is_read_whole_and_charged_as_it_comes() {
        let shed = shed();
        let mut charges = Charges::new(&shed, TenantId::new(), 0);
        let (tx, body) = streamed();
        for piece in ["[1,", "2,", "3]"] {
            tx.unbounded_send(Ok(Frame::data(Bytes::from(piece))))
                .unwrap();
        }
        tx.unbounded_send(Ok(Frame::trailers(HeaderMap::new())))
            .unwrap();
        drop(tx);
        let read = read_limited(body, 100, &mut charges, Duration::from_secs(5)).await;
        assert_eq!(&read.unwrap()[..], b"[1,2,3]");
        assert_eq!(shed.bytes_free(), 1000 - 7);
        drop(charges);
        assert_eq!(shed.bytes_free(), 1000);
    }

    /// A body that goes past the limit is refused as the frame that passes it arrives; one
    /// that stops arriving is refused once its time is up; what either held goes back.
    #[tokio::test]
    async fn too_much_or_too_slow_is_refused_and_let_go_of() {
        let shed = shed();
        let mut charges = Charges::new(&shed, TenantId::new(), 0);
        let (tx, body) = streamed();
        tx.unbounded_send(Ok(Frame::data(Bytes::from(vec![b'x'; 60]))))
            .unwrap();
        tx.unbounded_send(Ok(Frame::data(Bytes::from(vec![b'x'; 60]))))
            .unwrap();
        let read = read_limited(body, 100, &mut charges, Duration::from_secs(5)).await;
        assert!(matches!(read, Err(Unreadable::TooLarge(100))), "{read:?}");
        drop(tx);

        let (tx, body) = streamed();
        tx.unbounded_send(Ok(Frame::data(Bytes::from("["))))
            .unwrap();
        let within = Duration::from_millis(50);
        let read = read_limited(body, 100, &mut charges, within).await;
        assert!(
            matches!(read, Err(Unreadable::Slow(w)) if w == within),
            "{read:?}"
        );
        drop((tx, charges));
        assert_eq!(shed.bytes_free(), 1000);
    }
}
