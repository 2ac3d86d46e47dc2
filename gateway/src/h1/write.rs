//! Answers the gateway writes itself, byte by byte.

use pingora::protocols::l4::stream::Stream as L4Stream;
use tokio::io::AsyncWriteExt;

use crate::reply::Reply;

/// A reply of the gateway's own (a refusal, an upstream failure), in the JSON error shape.
pub(super) async fn write_reply(
    io: &mut L4Stream,
    reply: Reply,
    request_id: &str,
    keep_alive: bool,
    head_only: bool,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let (status, headers, body) = reply.into_response(request_id, None);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status.as_u16()));
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (i, (name, value)) in headers.iter().enumerate() {
        // A later header of the same name replaces an earlier one.
        if !headers[i + 1..].iter().any(|(n, _)| n == name) {
            push_header(out, name, value);
        }
    }
    push_date(out);
    if !keep_alive && !headers.iter().any(|(n, _)| *n == "connection") {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(&body);
    }
    io.write_all(out).await?;
    io.flush().await
}

pub(super) fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `date`, as Pingora's server sends it: formatted once a second per thread.
pub(super) fn push_date(out: &mut Vec<u8>) {
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(pingora::protocols::http::date::get_cached_date().as_bytes());
    out.extend_from_slice(b"\r\n");
}

pub(super) fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(crate::reply::decimal(n, &mut [0; 20]));
}

pub(super) fn push_hex(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_as_text() {
        let mut out = Vec::new();
        push_decimal(&mut out, 0);
        out.push(b' ');
        push_decimal(&mut out, 18_446_744_073_709_551_615);
        out.push(b' ');
        push_hex(&mut out, 0);
        out.push(b' ');
        push_hex(&mut out, 0x1f40);
        assert_eq!(out, b"0 18446744073709551615 0 1f40");
    }
}
