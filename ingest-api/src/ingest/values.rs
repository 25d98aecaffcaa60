//! What a JSON body would make a door build, judged from its text before it is parsed.
//!
//! Parsed, a JSON text is a tree of `serde_json::Value`s far larger than the text: an array
//! element or an object member takes 32 bytes and more (64 with a vector's slack), a
//! non-empty object 632 bytes for its map's first node, a non-empty array 128 for its first
//! vector. A 10 MiB body of zeros would be 320 MB for one request, and one of nested
//! single-member objects over a gigabyte, so the JSON doors estimate that size in the text
//! first and refuse a body whose tree would pass [`MAX_TREE_BYTES`].
//!
//! And a key serde_json reserves for itself ([`RESERVED_PREFIX`]) makes it parse a string as
//! a JSON document of its own, so no such string is taken.

use memchr::{memchr, memchr2, memchr_iter, memmem};
use shared::events::FieldError;

use crate::error::IngestError;

/// The largest tree of JSON values one request may make a door build, as [`tree_bytes`]
/// estimates it: a full batch of `/v1/events` (1 000 events) makes about 5 MiB, an OTLP/JSON
/// export of 10 000 attributes about 15 MiB.
pub const MAX_TREE_BYTES: usize = 32 << 20;

/// What [`tree_bytes`] counts for each value (the document, an array element, an object
/// member), for each non-empty object, and for each non-empty array.
const VALUE_BYTES: usize = 64;
const OBJECT_BYTES: usize = 640;
const ARRAY_BYTES: usize = 128;

/// The most [`tree_bytes`] counts for one byte of JSON: a chain of single-member objects,
/// `{"":{"":…}}`, 5 bytes a level (a member and its object, 704 bytes). Shorter bodies than
/// this allows are not scanned. (Text that is not JSON can count more, `{{{{` 704 a byte,
/// but serde_json builds only the tree of the valid JSON before the byte it refuses, of which
/// at most 128 levels lack their closing brackets.)
const DENSEST: usize = (VALUE_BYTES + OBJECT_BYTES).div_ceil(5);

/// About how many bytes the tree of the JSON text `body` takes, counted without parsing it
/// (its syntax is checked when it is parsed). Strings, most of an event's text, are skipped
/// to their end with `memchr`.
pub fn tree_bytes(body: &[u8]) -> usize {
    let mut tally = Tally::default();
    let mut at = 0;
    while at < body.len() {
        tally.byte(body[at]);
        if body[at] == b'"' {
            at = string_end(body, at + 1);
        }
        at += 1;
    }
    tally.bytes()
}

/// What [`tree_bytes`] counts, fed the text outside strings a byte at a time (a string's
/// opening quote included): the values beyond the document, each non-empty object and array
/// (known at its first member or element), and the container just opened.
#[derive(Default)]
struct Tally {
    values: usize,
    objects: usize,
    arrays: usize,
    opened: u8,
}

impl Tally {
    fn byte(&mut self, b: u8) {
        if self.opened != 0 && !b.is_ascii_whitespace() {
            if b != b']' && b != b'}' {
                self.values += 1;
                if self.opened == b'{' {
                    self.objects += 1;
                } else {
                    self.arrays += 1;
                }
            }
            self.opened = 0;
        }
        match b {
            b',' => self.values += 1,
            b'[' | b'{' => self.opened = b,
            _ => {}
        }
    }

    fn bytes(&self) -> usize {
        (self.values + 1)
            .saturating_mul(VALUE_BYTES)
            .saturating_add(self.objects.saturating_mul(OBJECT_BYTES))
            .saturating_add(self.arrays.saturating_mul(ARRAY_BYTES))
    }
}

/// Where the string whose text starts at `from` ends: its closing quote, or the end of the
/// body when it has none.
fn string_end(body: &[u8], mut from: usize) -> usize {
    while let Some(found) = body.get(from..).and_then(|rest| memchr2(b'"', b'\\', rest)) {
        from += found;
        if body[from] == b'"' {
            return from;
        }
        // An escape: the next byte is the escaped one.
        from += 2;
    }
    body.len()
}

/// [`tree_bytes`] of `body` when it is over [`MAX_TREE_BYTES`]. A body that could not pass
/// the limit is not scanned: one too short to, even were it the densest JSON of its length,
/// or one whose brackets and commas, counted with `memchr` (each as if it opened a container
/// or began a value), are too few to. The requests senders make cost next to nothing here.
pub fn over_limit(body: &[u8]) -> Option<usize> {
    if body.len().saturating_mul(DENSEST) + VALUE_BYTES <= MAX_TREE_BYTES {
        return None;
    }
    let count = |b: u8| memchr_iter(b, body).count();
    let (objects, arrays, commas) = (count(b'{'), count(b'['), count(b','));
    let most = (1 + objects + arrays + commas) * VALUE_BYTES
        + objects * OBJECT_BYTES
        + arrays * ARRAY_BYTES;
    if most <= MAX_TREE_BYTES {
        return None;
    }
    let n = tree_bytes(body);
    (n > MAX_TREE_BYTES).then_some(n)
}

/// How a refusal for [`over_limit`] reads.
pub fn too_big(bytes: usize) -> String {
    format!(
        "the body would make about {} MiB of JSON values once parsed; at most {} MiB a request",
        bytes.div_ceil(1 << 20),
        MAX_TREE_BYTES >> 20
    )
}

/// The keys serde_json reserves: with its `raw_value` feature, on in every service (axum and
/// sqlx ask for it), an object whose first key is `$serde_json::private::RawValue` is read as
/// the JSON document its value's text holds — a string becomes any tree, unbounded by the
/// size estimate and 128 levels deeper than the depth limit — and a map that holds it as a
/// member is written in a form no reader takes back.
pub const RESERVED_PREFIX: &str = "$serde_json::private::";

/// Whether a key of the JSON text `body` starts with [`RESERVED_PREFIX`], however its
/// characters are escaped. A body with neither a `$` nor a `\u0024` (found with `memchr`)
/// holds none; any other is walked once, string by string, each string's first characters
/// compared with the prefix and the byte after it with `:`.
pub fn holds_reserved(body: &[u8]) -> bool {
    if memchr(b'$', body).is_none() && memmem::find(body, br"\u0024").is_none() {
        return false;
    }
    let mut at = 0;
    while at < body.len() {
        if body[at] == b'"' {
            let end = string_end(body, at + 1);
            if starts_reserved(&body[at + 1..end])
                && body[end..]
                    .iter()
                    .skip(1)
                    .find(|b| !b.is_ascii_whitespace())
                    == Some(&b':')
            {
                return true;
            }
            at = end;
        }
        at += 1;
    }
    false
}

/// Whether the text of a string, as written between its quotes, starts with
/// [`RESERVED_PREFIX`] once its escapes are read. The prefix holds no `"`, `\` or `/`, so of
/// the escapes only `\uXXXX` can spell one of its characters.
fn starts_reserved(text: &[u8]) -> bool {
    let mut at = 0;
    RESERVED_PREFIX.bytes().all(|want| {
        let got = match text.get(at) {
            Some(b'\\') => {
                let hex = text
                    .get(at + 2..at + 6)
                    .filter(|_| text.get(at + 1) == Some(&b'u'));
                at += 6;
                hex.and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
            }
            Some(&b) => {
                at += 1;
                Some(u32::from(b))
            }
            None => None,
        };
        got == Some(u32::from(want))
    })
}

/// How a refusal for [`holds_reserved`] reads.
pub fn reserved() -> String {
    format!("a key starts with `{RESERVED_PREFIX}`, which the JSON reader reserves")
}

/// The checks of this module as the events door answers them: 413 `too-many-values`, or
/// 422, each naming the body.
pub fn check(body: &[u8]) -> Result<(), IngestError> {
    if let Some(bytes) = over_limit(body) {
        return Err(IngestError::too_many_values(FieldError::new(
            "body",
            too_big(bytes),
        )));
    }
    if holds_reserved(body) {
        return Err(IngestError::validation(
            "the body cannot be read",
            vec![FieldError::new("body", reserved())],
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(text: &str) -> usize {
        tree_bytes(text.as_bytes()) / VALUE_BYTES
    }

    /// [`tree_bytes`] with its strings read a byte at a time, as it was first written.
    fn tree_bytes_bytewise(body: &[u8]) -> usize {
        let mut tally = Tally::default();
        let (mut in_string, mut escaped) = (false, false);
        for &b in body {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            tally.byte(b);
            in_string = b == b'"';
        }
        tally.bytes()
    }

    /// Every text made of JSON's structural bytes, up to 5 long, and some longer ones, count
    /// the same skipping strings as a byte at a time.
    #[test]
    fn strings_are_skipped_as_read_a_byte_at_a_time() {
        const BYTES: &[u8] = br#"{}[],:"\a "#;
        let mut texts: Vec<Vec<u8>> = vec![vec![]];
        let mut last = vec![vec![]];
        for _ in 0..5 {
            last = last
                .iter()
                .flat_map(|t: &Vec<u8>| {
                    BYTES.iter().map(move |&b| {
                        let mut t = t.clone();
                        t.push(b);
                        t
                    })
                })
                .collect();
            texts.extend(last.iter().cloned());
        }
        texts.push(br#"{"a\"b": ["x\\", "\u0022", {"c": [1, 2]}], "d": "e\\"}"#.to_vec());
        texts.push(br#"["abc\"#.to_vec());
        for t in &texts {
            assert_eq!(
                tree_bytes(t),
                tree_bytes_bytewise(t),
                "{}",
                String::from_utf8_lossy(t)
            );
        }
    }

    #[test]
    fn values_and_containers_are_counted_in_the_text() {
        assert_eq!(values("{}"), 1);
        assert_eq!(values("[]"), 1);
        assert_eq!(
            tree_bytes(br#"{"a":[1, 2,3], "b" : { }}"#),
            6 * VALUE_BYTES + OBJECT_BYTES + ARRAY_BYTES
        );
        assert_eq!(
            values(r#"["{,[", "\",", [ ]]"#),
            4 + ARRAY_BYTES / VALUE_BYTES
        );
    }

    /// What is not scanned cannot be over the limit: the densest JSON of each shape (the
    /// chain nested deeper than serde_json reads, to keep its density), a little longer than
    /// the longest body left unscanned, counts no more than `DENSEST` a byte.
    #[test]
    fn short_bodies_are_within_the_limit_unscanned() {
        let unscanned = (MAX_TREE_BYTES - VALUE_BYTES) / DENSEST;
        let flat = |item: &str| {
            let n = unscanned / (item.len() + 1) + 1;
            format!("[{}{item}]", format!("{item},").repeat(n - 1))
        };
        let chain = {
            let n = unscanned / 5 + 1;
            format!("{}0{}", r#"{"":"#.repeat(n), "}".repeat(n))
        };
        let nested = format!("{}{}", "[".repeat(unscanned / 2), "]".repeat(unscanned / 2));
        for body in [
            flat("0"),
            flat("[]"),
            flat("{}"),
            flat(r#""""#),
            flat("[0]"),
            flat(r#"{"":0}"#),
            chain,
            nested,
        ] {
            let estimate = tree_bytes(body.as_bytes());
            assert!(
                estimate <= body.len() * DENSEST + VALUE_BYTES,
                "{}…: {estimate}",
                &body[..12]
            );
        }
        // So a body the length check leaves unscanned estimates within the limit, and one
        // byte more is looked at.
        assert!(unscanned * DENSEST + VALUE_BYTES <= MAX_TREE_BYTES);
        assert!((unscanned + 1) * DENSEST + VALUE_BYTES > MAX_TREE_BYTES);
        // What the brackets and commas bound is never below the estimate.
        for t in [
            br#"{"a": [1, {"b": "{[,"}], "c": {}}"#.as_slice(),
            b",,,,[[{{",
            br#"["\"", "]]]]"]"#,
        ] {
            let count = |b: u8| t.iter().filter(|&&c| c == b).count();
            let (o, a, c) = (count(b'{'), count(b'['), count(b','));
            let most = (1 + o + a + c) * VALUE_BYTES + o * OBJECT_BYTES + a * ARRAY_BYTES;
            assert!(tree_bytes(t) <= most, "{}", String::from_utf8_lossy(t));
        }
        let zeros = format!("[{}0]", "0,".repeat(MAX_TREE_BYTES / VALUE_BYTES));
        assert!(over_limit(zeros.as_bytes()).is_some());
        let levels = MAX_TREE_BYTES / (VALUE_BYTES + OBJECT_BYTES) + 1;
        let chain = format!("{}0{}", r#"{"":"#.repeat(levels), "}".repeat(levels));
        assert!(chain.len() < 300_000);
        assert!(over_limit(chain.as_bytes()).is_some());
    }

    #[test]
    fn reserved_keys_are_found_however_escaped() {
        for body in [
            r#"{"$serde_json::private::RawValue": "[0]"}"#,
            r#"{"a": [{"\u0024serde_json::private::RawValue": "x"}]}"#,
            r#"{"a": {"$serde_json::private::RawValu\u0065": "x"}}"#,
            "{\"$serde_json::private::Number\" \n : 1}",
        ] {
            assert!(holds_reserved(body.as_bytes()), "{body}");
        }
        for body in [
            r#"{"a": "$serde_json::private::RawValue"}"#,
            r#"["$serde_json::private::RawValue", ":"]"#,
            r#"{"a": "$HOME", "b": "echo \"$PATH\"", "$c": 1}"#,
            r#"{"a": "x$serde_json::private::RawValue"}"#,
            r#"$"#,
            r#"\u0024"#,
            r#"{"a": "\u0024serde_json::private"}"#,
            r#"{"\"$serde_json::private::x": 1}"#,
            r#"{"a": "\"$serde_json::private::x\": 1"}"#,
        ] {
            assert!(!holds_reserved(body.as_bytes()), "{body}");
        }
        // Read once: a string of escaped quotes each followed by a `$` is not read again
        // from each of them.
        let body = format!(r#"["{}"]"#, r#"\"$"#.repeat(1_000_000));
        assert!(!holds_reserved(body.as_bytes()));
    }
}
