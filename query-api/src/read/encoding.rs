//! Answers on the wire: compressed once and served compressed to clients that accept gzip,
//! and not sent again to a client that holds them already.
//!
//! - An answer of [`PACK_FROM`] bytes or more is gzip-compressed once, when it is computed
//!   ([`pack`]), and cached that way: a hit serves the cached bytes as they are, with
//!   `Content-Encoding: gzip`. [`negotiate`] inflates them for a client whose
//!   `Accept-Encoding` does not take gzip, so every client gets the same answer.
//! - An answer's `ETag` is a hash of its bytes as stored ([`etag`]): a client that sends it
//!   back in `If-None-Match` is answered `304 Not Modified`, without a body, while the answer
//!   is the same — for a cached one, while the projection has not moved. Answers say
//!   `Cache-Control: private, no-cache`, so a browser keeps them and asks again each time,
//!   and no shared cache keeps them.

use std::hash::{DefaultHasher, Hasher};
use std::io::{Read, Write};

use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use shared::problem::Problem;

/// Answers shorter than this are stored and sent as they are: gzip's header and trailer
/// would take back most of what it saves.
pub const PACK_FROM: usize = 1024;

/// The largest answer [`negotiate`] inflates for a client without gzip (answers are the
/// service's own, at most [`MAX_ANSWER`] since it was set; this bounds one answer cached by
/// an older query-api).
const MAX_UNPACKED: usize = 64 << 20;

/// The largest answer, as JSON, that a read computes ([`to_json_within`]): one over it is
/// refused (422 `answer-too-large`) rather than built, packed and cached. Every answer the
/// dashboards ask for is far smaller (a 5 000-point series of 21 groups is about 4 MiB); text
/// the senders chose (prompts, agent names, label values) is what can make one larger, at up
/// to six bytes of JSON a character.
pub const MAX_ANSWER: usize = 16 << 20;

/// How much of an answer is inflated at a time for a client without gzip: it is sent as it
/// is inflated, at the pace the client reads, so a client that reads slowly or not at all
/// holds the packed answer and this much, not the whole answer.
const INFLATE_CHUNK: usize = 64 << 10;

/// `answer` as JSON, or `None` when it would be over `limit` bytes (written no further).
pub fn to_json_within<T: serde::Serialize + ?Sized>(
    answer: &T,
    limit: usize,
) -> Result<Option<Vec<u8>>, serde_json::Error> {
    /// A buffer that refuses to grow past its limit.
    struct Within {
        json: Vec<u8>,
        limit: usize,
        over: bool,
    }
    impl Write for Within {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.json.len() + buf.len() > self.limit {
                self.over = true;
                return Err(std::io::Error::other("over the limit"));
            }
            self.json.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut out = Within {
        json: Vec::new(),
        limit,
        over: false,
    };
    match serde_json::to_writer(&mut out, answer) {
        Ok(()) => Ok(Some(out.json)),
        Err(_) if out.over => Ok(None),
        Err(e) => Err(e),
    }
}

/// The problem for an answer over [`MAX_ANSWER`].
pub fn answer_too_large() -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "answer-too-large",
        "Answer too large",
        format!(
            "the answer would be over {} MiB of JSON; ask for a shorter range, fewer rows \
             (limit) or narrower filters",
            MAX_ANSWER >> 20
        ),
    )
    .with_errors(vec![shared::events::FieldError::new(
        "range",
        "holds more than one answer may carry",
    )])
}

/// `json` as it is stored and sent: gzip-compressed from [`PACK_FROM`] bytes.
pub fn pack(json: Vec<u8>) -> Vec<u8> {
    if json.len() < PACK_FROM {
        return json;
    }
    let mut gz = GzEncoder::new(
        Vec::with_capacity(json.len() / 4),
        flate2::Compression::fast(),
    );
    match gz.write_all(&json).and_then(|()| gz.finish()) {
        Ok(packed) => packed,
        Err(_) => json,
    }
}

/// Whether `stored` is a packed answer (gzip's magic bytes; JSON never starts with them).
pub fn is_packed(stored: &[u8]) -> bool {
    stored.starts_with(&[0x1f, 0x8b])
}

/// The JSON of a stored answer, if it is at most `limit` bytes; `None` when it is longer,
/// or a packed one does not inflate (never a part of it).
pub fn unpack(stored: &[u8], limit: usize) -> Option<Vec<u8>> {
    if !is_packed(stored) {
        return (stored.len() <= limit).then(|| stored.to_vec());
    }
    let mut json = Vec::with_capacity(stored.len().saturating_mul(4).min(limit));
    GzDecoder::new(stored)
        .take(limit as u64 + 1)
        .read_to_end(&mut json)
        .ok()?;
    (json.len() <= limit).then_some(json)
}

/// A weak validator of the answer stored as `stored`: a hash of its bytes, so that it changes
/// exactly when they do (after an upgrade that changes an answer's form too) and tells a
/// client nothing the answer does not.
pub fn etag(stored: &[u8]) -> HeaderValue {
    let mut h = DefaultHasher::new();
    h.write(stored);
    HeaderValue::from_str(&format!("W/\"{:016x}\"", h.finish())).expect("hex is a header value")
}

/// A JSON answer as stored (packed or not), with what says so and how it may be kept.
pub fn answer(stored: Vec<u8>, etag: Option<HeaderValue>) -> Response {
    let packed = is_packed(&stored);
    let body = Body::from(stored);
    sent_as_stored(body, packed, "application/json", "private, no-cache", etag)
}

/// `body` as stored (`packed` or not: then `Content-Encoding: gzip`), of `content_type`,
/// kept as `cache_control` says, with its validator.
pub fn sent_as_stored(
    body: Body,
    packed: bool,
    content_type: &'static str,
    cache_control: &'static str,
    etag: Option<HeaderValue>,
) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if packed {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if let Some(tag) = etag {
        h.insert(header::ETAG, tag);
    }
    res
}

/// A response's body, read back whole, as sent and as JSON; `None` when either is longer
/// than `limit` bytes.
pub async fn read_back(
    res: Response,
    limit: usize,
) -> Option<(axum::http::response::Parts, axum::body::Bytes, Vec<u8>)> {
    let (parts, body) = res.into_parts();
    let sent = to_bytes(body, limit).await.ok()?;
    let json = match parts.headers.get(header::CONTENT_ENCODING) {
        Some(v) if v == "gzip" => unpack(&sent, limit)?,
        _ => sent.to_vec(),
    };
    Some((parts, sent, json))
}

/// Whether a request's `Accept-Encoding` takes gzip (RFC 9110 §12.5.3: `gzip`, `x-gzip` or
/// `*` with a non-zero weight, unless gzip is named with weight 0).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut star = false;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let weighted = parts.all(|p| {
                let p = p.trim();
                match p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                    Some(q) => q.trim().parse::<f32>().is_ok_and(|q| q > 0.0),
                    None => true,
                }
            });
            if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                return weighted;
            }
            if coding == "*" {
                star = weighted;
            }
        }
    }
    star
}

/// Whether the `If-None-Match` values `held` name `tag` (weak comparison, RFC 9110
/// §13.1.2; `*` matches).
fn none_match(held: &[HeaderValue], tag: &HeaderValue) -> bool {
    fn opaque(t: &str) -> &str {
        t.trim().trim_start_matches("W/").trim_start()
    }
    let Ok(tag) = tag.to_str() else { return false };
    let ours = opaque(tag);
    held.iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*" || opaque(t) == ours)
}

/// The service's edge: `304 Not Modified` for an answer the client holds (its `ETag` named
/// in `If-None-Match`); a packed body inflated for a client that does not take gzip; a CSV
/// export compressed for one that does (it is built for each request, never cached).
pub async fn negotiate(request: Request, next: Next) -> Response {
    let gzip = accepts_gzip(request.headers());
    let held: Vec<HeaderValue> = request
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .cloned()
        .collect();
    let res = next.run(request).await;
    if let Some(not_modified) = not_modified(&res, &held) {
        return not_modified;
    }
    let h = res.headers();
    let packed = h.get(header::CONTENT_ENCODING).map(|v| v == "gzip");
    let csv = h
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/csv"));
    match (packed, gzip) {
        (Some(true), false) => inflated(res).await,
        (None, true) if csv && res.status() == StatusCode::OK => compressed(res).await,
        _ => res,
    }
}

/// `304 Not Modified` (with the answer's validator and caching headers, no body) when `res`
/// is an answer whose `ETag` the client holds (`held`: its `If-None-Match` values).
fn not_modified(res: &Response, held: &[HeaderValue]) -> Option<Response> {
    if res.status() != StatusCode::OK || held.is_empty() {
        return None;
    }
    let tag = res.headers().get(header::ETAG)?;
    if !none_match(held, tag) {
        return None;
    }
    // No body and no length: a 304's `Content-Length` would claim to be the answer's (RFC 9110
    // §8.6), and axum writes an empty body's, 0, into the answer to a `HEAD`. A body of no
    // known size gets none.
    let unsized_empty = futures::stream::empty::<Result<Vec<u8>, std::convert::Infallible>>();
    let mut not_modified =
        (StatusCode::NOT_MODIFIED, Body::from_stream(unsized_empty)).into_response();
    for name in [header::ETAG, header::CACHE_CONTROL, header::VARY] {
        if let Some(v) = res.headers().get(&name) {
            not_modified.headers_mut().insert(name, v.clone());
        }
    }
    Some(not_modified)
}

/// `res`, whose body is packed, sent inflated (within [`MAX_UNPACKED`]) as the client reads
/// it, [`INFLATE_CHUNK`] at a time: what a client without gzip holds is the packed answer,
/// not the inflated one. (Inflated whole, an answer of many MiB was held for as long as a
/// client took to read it, for every such client at once.)
async fn inflated(res: Response) -> Response {
    let (mut parts, body) = res.into_parts();
    let Ok(sent) = to_bytes(body, usize::MAX).await else {
        return Problem::internal().into_response();
    };
    parts.headers.remove(header::CONTENT_ENCODING);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from_stream(inflating(sent, MAX_UNPACKED)))
}

/// The packed answer `sent` inflated, a chunk at a time as it is polled; an error (ending
/// the response early) if it does not inflate or passes `limit` bytes.
fn inflating(
    sent: axum::body::Bytes,
    limit: usize,
) -> impl futures::Stream<Item = std::io::Result<axum::body::Bytes>> {
    let gzip = GzDecoder::new(std::io::Cursor::new(sent)).take(limit as u64 + 1);
    futures::stream::try_unfold((gzip, 0usize), move |(mut gzip, mut total)| async move {
        let mut chunk = vec![0; INFLATE_CHUNK];
        let mut filled = 0;
        while filled < chunk.len() {
            match gzip.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    tracing::warn!(error = %e, "a cached answer does not inflate; its response is cut");
                    return Err(e);
                }
            }
        }
        if filled == 0 {
            return Ok(None);
        }
        total += filled;
        if total > limit {
            tracing::warn!(
                limit,
                "a cached answer inflates past its limit; its response is cut"
            );
            return Err(std::io::Error::other("the answer inflates past its limit"));
        }
        chunk.truncate(filled);
        Ok(Some((axum::body::Bytes::from(chunk), (gzip, total))))
    })
}

/// `res` packed ([`pack`]: from [`PACK_FROM`] bytes).
async fn compressed(res: Response) -> Response {
    let (mut parts, body) = res.into_parts();
    let Ok(plain) = to_bytes(body, usize::MAX).await else {
        return Problem::internal().into_response();
    };
    let sent = pack(plain.to_vec());
    if is_packed(&sent) {
        parts
            .headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    parts
        .headers
        .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    Response::from_parts(parts, Body::from(sent))
}

#[cfg(test)]
mod tests {
    use axum::http::{header, HeaderMap, HeaderValue};

    use super::*;

    #[test]
    fn an_answer_is_written_within_its_limit_or_not_at_all() {
        let answer = vec!["\u{1}".repeat(100); 10];
        let whole = serde_json::to_vec(&answer).unwrap();
        assert_eq!(whole.len(), 10 * 602 + 11);
        let within = to_json_within(&answer, whole.len()).unwrap();
        assert_eq!(within.as_deref(), Some(&whole[..]));
        assert_eq!(to_json_within(&answer, whole.len() - 1).unwrap(), None);
        assert_eq!(to_json_within(&answer, 10).unwrap(), None);
    }

    #[tokio::test]
    async fn a_packed_answer_is_inflated_a_chunk_at_a_time() {
        use futures::StreamExt;
        // 1 MiB of JSON that packs small: sent as 16 chunks of at most 64 KiB, inflated one
        // by one as the client reads, the same bytes in all.
        let json = serde_json::to_vec(&vec![1_000_000u32; 1 << 17]).unwrap();
        let packed = pack(json.clone());
        assert!(packed.len() * 50 < json.len(), "{} packed", packed.len());
        let mut chunks = Box::pin(inflating(packed.clone().into(), MAX_UNPACKED));
        let mut all = Vec::new();
        let mut n = 0;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= INFLATE_CHUNK);
            all.extend_from_slice(&chunk);
            n += 1;
        }
        assert_eq!(all, json);
        assert_eq!(n, json.len().div_ceil(INFLATE_CHUNK));
        // Past the limit, or not gzip: the stream ends in an error, never a part as whole.
        let mut capped = Box::pin(inflating(packed.into(), json.len() - 1));
        let mut failed = false;
        while let Some(chunk) = capped.next().await {
            failed |= chunk.is_err();
        }
        assert!(failed);
        let mut broken = Box::pin(inflating(vec![0x1f, 0x8b, 1, 2, 3].into(), MAX_UNPACKED));
        assert!(broken.next().await.unwrap().is_err());
    }

    fn accepting(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn gzip_is_taken_only_where_the_client_says_so() {
        for yes in [
            &["gzip"][..],
            &["deflate, gzip;q=1.0, *;q=0.5"],
            &["GZIP"],
            &["x-gzip"],
            &["*"],
            &["br", "gzip; q=0.1"],
        ] {
            assert!(accepts_gzip(&accepting(yes)), "{yes:?}");
        }
        for no in [
            &[][..],
            &["identity"],
            &["gzip;q=0"],
            &["gzip; q=0.000"],
            &["*;q=0"],
            &["*, gzip;q=0"],
            &["br, deflate"],
            &["gzip;q=nonsense"],
        ] {
            assert!(!accepts_gzip(&accepting(no)), "{no:?}");
        }
    }

    #[test]
    fn answers_are_packed_from_a_kibibyte_and_unpack_to_themselves() {
        let small = br#"{"a":1}"#.to_vec();
        assert_eq!(pack(small.clone()), small);
        assert_eq!(unpack(&small, 7).unwrap(), small);
        assert_eq!(unpack(&small, 6), None);
        let big = serde_json::to_vec(&vec![
            serde_json::json!({"t": "2026-12-07", "count": 1});
            200
        ])
        .unwrap();
        let packed = pack(big.clone());
        assert!(
            is_packed(&packed) && packed.len() * 10 < big.len(),
            "{}",
            packed.len()
        );
        assert_eq!(unpack(&packed, big.len()).unwrap(), big);
        assert_eq!(
            unpack(&packed, big.len() - 1),
            None,
            "never a part of an answer"
        );
        assert_eq!(
            unpack(&[0x1f, 0x8b, 0, 0], 1 << 20),
            None,
            "a broken entry is not an answer"
        );
    }

    #[test]
    fn validators_follow_the_bytes_and_match_weakly() {
        let answer = br#"{"events_total":41}"#;
        let tag = etag(answer);
        let s = tag.to_str().unwrap();
        let hex = s
            .strip_prefix("W/\"")
            .and_then(|s| s.strip_suffix('"'))
            .unwrap();
        assert!(
            hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{s}"
        );
        assert_eq!(tag, etag(answer), "the same bytes, the same validator");
        assert_ne!(tag, etag(br#"{"events_total":42}"#));
        let held = |v: &str| [HeaderValue::from_str(v).unwrap()];
        assert!(none_match(&held(s), &tag));
        assert!(none_match(&held(s.trim_start_matches("W/")), &tag));
        assert!(none_match(&held(&format!("\"a\", {s}")), &tag));
        assert!(none_match(&held("*"), &tag));
        assert!(!none_match(&held("W/\"a\""), &tag));
    }
}
