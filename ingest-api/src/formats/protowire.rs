//! Reading protobuf straight from its wire bytes, without decoding it: the doors that take
//! protobuf (remote write, OTLP) count what a request holds this way before prost allocates
//! anything for it.

fn take<'a>(n: usize, buf: &mut &'a [u8]) -> Result<&'a [u8], String> {
    if buf.len() < n {
        return Err("truncated field".into());
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// Calls `f` with the number of every top-level field of the protobuf message `buf`, and the
/// bytes of the length-delimited ones; groups (deprecated) are skipped whole.
pub(crate) fn each_field<'a>(
    mut buf: &'a [u8],
    mut f: impl FnMut(u64, Option<&'a [u8]>) -> Result<(), String>,
) -> Result<(), String> {
    let mut depth = 0usize;
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (tag, wire_type) = (key >> 3, key & 7);
        if tag == 0 {
            return Err("field number 0".into());
        }
        let value = match wire_type {
            0 => {
                varint(&mut buf)?;
                None
            }
            1 => {
                take(8, &mut buf)?;
                None
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| "length overflow")?;
                Some(take(len, &mut buf)?)
            }
            3 => {
                depth += 1;
                continue;
            }
            4 => {
                depth = depth.checked_sub(1).ok_or("unexpected end of group")?;
                continue;
            }
            5 => {
                take(4, &mut buf)?;
                None
            }
            other => return Err(format!("unknown wire type {other}")),
        };
        if depth == 0 {
            f(tag, value)?;
        }
    }
    if depth > 0 {
        return Err("unterminated group".into());
    }
    Ok(())
}
