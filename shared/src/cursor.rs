//! Opaque page cursors: a position `(time, id)` encoded as URL-safe base64 of `time|id`.

use std::fmt::Display;
use std::str::FromStr;

use crate::problem::Problem;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};

/// The cursor of the page after the row at `(t, id)`.
pub fn encode(t: DateTime<Utc>, id: impl Display) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}|{id}", t.to_rfc3339()))
}

/// A cursor this API returned, or a 400 naming the `cursor` parameter.
pub fn decode<I: FromStr>(c: &str) -> Result<(DateTime<Utc>, I), Problem> {
    let text = text(c)?;
    let (t, id) = text.split_once('|').ok_or_else(invalid)?;
    let t = DateTime::parse_from_rfc3339(t).map_err(|_| invalid())?;
    let id = id.parse().map_err(|_| invalid())?;
    Ok((t.with_timezone(&Utc), id))
}

/// The cursor of the page after the row ranked `(score, key)` (lists sorted by score, then key).
pub fn encode_ranked(score: f64, key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{score}|{key}"))
}

/// A ranked cursor this API returned, or a 400 naming the `cursor` parameter.
pub fn decode_ranked(c: &str) -> Result<(f64, String), Problem> {
    let text = text(c)?;
    let (score, key) = text.split_once('|').ok_or_else(invalid)?;
    let score: f64 = score.parse().map_err(|_| invalid())?;
    if !score.is_finite() {
        return Err(invalid());
    }
    Ok((score, key.to_string()))
}

/// The cursor of the page after the row keyed `key` (lists sorted by a text key).
pub fn encode_key(key: &str) -> String {
    URL_SAFE_NO_PAD.encode(key)
}

/// A keyed cursor this API returned, or a 400 naming the `cursor` parameter.
pub fn decode_key(c: &str) -> Result<String, Problem> {
    text(c)
}

/// What a cursor encodes (text PostgreSQL can take: no NUL).
fn text(c: &str) -> Result<String, Problem> {
    URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|t| !t.contains('\0'))
        .ok_or_else(invalid)
}

/// 400 `invalid-parameter` naming `cursor`.
fn invalid() -> Problem {
    Problem::invalid_parameter("cursor", "not a cursor this API returned")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let t = Utc::now();
        let id = uuid::Uuid::now_v7();
        let (t2, id2): (DateTime<Utc>, uuid::Uuid) = decode(&encode(t, id)).unwrap();
        assert_eq!((t2, id2), (t, id));
        let (_, s): (DateTime<Utc>, String) = decode(&encode(t, "session|with|bars")).unwrap();
        assert_eq!(s, "session|with|bars");
        assert!(decode::<uuid::Uuid>("garbage").is_err());
        assert!(decode::<uuid::Uuid>(&encode(t, "not-a-uuid")).is_err());
        assert_eq!(
            decode_ranked(&encode_ranked(87.3, "team|a")).unwrap(),
            (87.3, "team|a".to_string())
        );
        assert!(decode_ranked(&URL_SAFE_NO_PAD.encode("NaN|x")).is_err());
        assert!(decode_ranked("garbage").is_err());
        assert_eq!(decode_key(&encode_key("team|é")).unwrap(), "team|é");
        assert!(decode_key("%%%").is_err());
        assert!(decode_key(&encode_key("a\0b")).is_err());
    }
}
