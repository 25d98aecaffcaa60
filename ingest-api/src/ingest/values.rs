//! How many values a JSON body holds, counted in its text before it is parsed. Parsed, each
//! value costs 32 bytes or more, and an object member or an array element the more (a `0,`
//! is 2 bytes of text), so a JSON door bounds what one request can make it build by counting
//! first.

/// Most JSON values (objects, arrays, strings, numbers, each object member counting as one)
/// one request to a JSON door may hold: 250 per event of a full batch of `/v1/events`, where
/// an event written as the contract expects holds 10 to 40.
pub const MAX_JSON_VALUES: usize = 250_000;

/// How many values the JSON text `body` holds, counted without parsing it (its syntax is
/// checked when it is parsed): the document, and one for each array element and object
/// member.
pub fn values(body: &[u8]) -> usize {
    let (mut count, mut in_string, mut escaped, mut opened) = (1usize, false, false, false);
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
        if opened && !b.is_ascii_whitespace() {
            opened = false;
            if b != b']' && b != b'}' {
                count += 1;
            }
        }
        match b {
            b'"' => in_string = true,
            b',' => count += 1,
            b'[' | b'{' => opened = true,
            _ => {}
        }
    }
    count
}

/// The values `body` holds when they are more than [`MAX_JSON_VALUES`]. Every value but the
/// document takes two bytes of text or more (itself, and a separator or its container's
/// bracket), so a body of `n` bytes holds at most `(n + 1) / 2` and a shorter one than twice
/// the limit is not scanned: the requests senders make cost nothing here.
pub fn over_limit(body: &[u8]) -> Option<usize> {
    if body.len().div_ceil(2) <= MAX_JSON_VALUES {
        return None;
    }
    let n = values(body);
    (n > MAX_JSON_VALUES).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_counted_in_the_text() {
        assert_eq!(values(b"{}"), 1);
        assert_eq!(values(br#"{"a":[1, 2,3], "b" : { }}"#), 6);
        assert_eq!(values(br#"["{,[", "\",", [ ]]"#), 4);
    }

    /// What is not scanned cannot be over the limit: the densest JSON there is, a flat array
    /// of one-digit numbers or of empty arrays, just under twice the limit in bytes.
    #[test]
    fn short_bodies_are_within_the_limit_unscanned() {
        for item in ["0", "[]", "{}", r#""""#] {
            let n = (2 * MAX_JSON_VALUES) / (item.len() + 1);
            let body = format!("[{}{item}]", format!("{item},").repeat(n - 1));
            let counted = values(body.as_bytes());
            assert!(counted <= body.len().div_ceil(2), "{item}: {counted}");
            if body.len().div_ceil(2) <= MAX_JSON_VALUES {
                assert!(counted <= MAX_JSON_VALUES, "{item}: {counted}");
                assert_eq!(over_limit(body.as_bytes()), None);
            }
        }
        let bomb = format!("[{}0]", "0,".repeat(MAX_JSON_VALUES));
        assert_eq!(over_limit(bomb.as_bytes()), Some(MAX_JSON_VALUES + 2));
        let members: Vec<String> = (0..MAX_JSON_VALUES)
            .map(|i| format!(r#""{i}":0"#))
            .collect();
        let bomb = format!("{{{}}}", members.join(","));
        assert_eq!(over_limit(bomb.as_bytes()), Some(MAX_JSON_VALUES + 1));
    }
}
