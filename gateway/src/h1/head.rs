//! Reading a request head that `httparse` parsed, and finding where a response head ends.

use crate::policy;

/// A pass-through request's facts, from one pass over its headers (after
/// [`policy::check_head`] passed them).
#[derive(Default)]
pub(super) struct Facts<'a> {
    pub(super) close: bool,
    pub(super) authorization: Option<&'a str>,
    pub(super) forwarded_for: Option<&'a str>,
    pub(super) request_id: Option<&'a str>,
    pub(super) if_none_match: Option<&'a str>,
    /// W3C trace context, for the access log.
    pub(super) traceparent: Option<&'a str>,
    /// An `Origin` header (CORS, which Pingora's path answers).
    pub(super) origin: bool,
    /// `Cache-Control: no-cache` or `no-store`.
    pub(super) no_cache: bool,
    /// `Expect: 100-continue`: the front answers it itself (and drops the header).
    pub(super) expect_continue: bool,
    /// Headers not forwarded upstream, a bit each.
    pub(super) dropped: u64,
}

/// Why the request head is not for this path.
pub(super) struct NotOurs;

/// Reads the headers once: connection handling, what the gateway needs, and which ones stay
/// behind ([`policy::stays_behind`], the ones `Connection` names, and a `Content-Length` the
/// chunked framing overrides).
pub(super) fn facts<'a>(
    headers: &[httparse::Header<'a>],
    framing: &policy::Framing,
) -> Result<Facts<'a>, NotOurs> {
    let mut f = Facts::default();
    let mut nominated = false;
    for (i, h) in headers.iter().enumerate() {
        let name = h.name.as_bytes();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        match name.len() {
            // The one expectation HTTP/1.1 defines is answered here; any other is Pingora's
            // (417).
            6 if is("expect") => {
                if !h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                    return Err(NotOurs);
                }
                f.expect_continue = true;
                f.dropped |= 1 << i;
            }
            6 if is("origin") => f.origin = true,
            7 if is("upgrade") => return Err(NotOurs),
            11 if is("traceparent") => f.traceparent = visible(h.value),
            10 if is("connection") => {
                for token in h.value.split(|b| *b == b',') {
                    if token.trim_ascii().eq_ignore_ascii_case(b"close") {
                        f.close = true;
                    }
                }
                nominated |= policy::nominated(h.value).next().is_some();
            }
            12 if is("x-request-id") => {
                f.request_id = visible(h.value).filter(|v| !v.is_empty() && v.len() <= 128);
            }
            13 if is("cache-control") => {
                f.no_cache |= visible(h.value)
                    .is_some_and(|v| v.contains("no-cache") || v.contains("no-store"));
            }
            13 if is("if-none-match") => f.if_none_match = visible(h.value),
            13 if is("authorization") => {
                f.authorization = Some(visible(h.value).ok_or(NotOurs)?);
            }
            14 if is("content-length") && framing.chunked => f.dropped |= 1 << i,
            15 if is("x-forwarded-for") => f.forwarded_for = visible(h.value),
            _ => {}
        }
        if policy::stays_behind(name) {
            f.dropped |= 1 << i;
        }
    }
    if nominated {
        // Rare: the headers a `Connection` names stay behind too (never `Host`).
        for c in headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        {
            for token in policy::nominated(c.value) {
                for (i, h) in headers.iter().enumerate() {
                    if h.name.as_bytes().eq_ignore_ascii_case(token) {
                        f.dropped |= 1 << i;
                    }
                }
            }
        }
    }
    f.close |= framing.close_after;
    Ok(f)
}

/// A header value as text, when it is visible ASCII (what `HeaderValue::to_str` accepts).
pub(super) fn visible(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

/// The length of the head at the start of `buf`, up to its empty line, if it is all there.
pub(super) fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = buf[from..].iter().position(|&b| b == b'\n') {
        let lf = from + p;
        match buf.get(lf + 1..lf + 3) {
            Some([b'\r', b'\n']) => return Some(lf + 3),
            Some([b'\n', _]) => return Some(lf + 2),
            None if buf.get(lf + 1) == Some(&b'\n') => return Some(lf + 2),
            _ => from = lf + 1,
        }
    }
    None
}

/// The status code of a response head (`HTTP/1.x NNN`), if it has one.
pub(super) fn status_of(head: &[u8]) -> Option<u16> {
    match head.get(..12)? {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', _, b' ', d @ ..]
            if d.iter().all(u8::is_ascii_digit) =>
        {
            Some(d.iter().fold(0, |n, b| n * 10 + u16::from(b - b'0')))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_that_stay_behind_and_requests_left_to_pingora() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        let raw = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\
            Keep-Alive: 5\r\nX-Shopverse-User: mallory\r\nX-Request-Id: abc\r\n\
            Authorization: Bearer t\r\nContent-Length: 3\r\nTE: trailers\r\n\r\n";
        req.parse(raw).unwrap();
        let framing = policy::Framing {
            content_length: Some(3),
            ..Default::default()
        };
        let f = facts(req.headers, &framing)
            .map_err(|_| "not ours")
            .unwrap();
        assert!(f.close);
        assert_eq!(f.request_id, Some("abc"));
        assert_eq!(f.authorization, Some("Bearer t"));
        let kept: Vec<&str> = req
            .headers
            .iter()
            .enumerate()
            .filter(|(i, _)| f.dropped & (1 << i) == 0)
            .map(|(_, h)| h.name)
            .collect();
        assert_eq!(kept, ["Host", "Authorization", "Content-Length"]);

        // What `Connection` names stays behind too, `Host` never.
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: host, x-secret\r\nX-Secret: 1\r\n\r\n",
        )
        .unwrap();
        let f = facts(req.headers, &policy::Framing::default())
            .map_err(|_| "not ours")
            .unwrap();
        assert_eq!(f.dropped, 0b110, "Connection and X-Secret, not Host");

        for raw in [
            &b"GET /x HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nExpect: something-else\r\n\r\n",
        ] {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(raw).unwrap();
            assert!(
                facts(req.headers, &policy::Framing::default()).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn response_heads_end_at_their_empty_line() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(head_end(head), Some(head.len() - 2));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\nx: 1\n\nok"), Some(22));
        for cut in 0..head.len() - 2 {
            assert_eq!(head_end(&head[..cut]), None, "cut at {cut}");
        }
        assert_eq!(status_of(b"HTTP/1.1 100 Continue\r\n"), Some(100));
        assert_eq!(status_of(b"HTTP/1.0 404 Not Found\r\n"), Some(404));
        assert_eq!(status_of(b"HTTP/1.1 2x0 OK\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 20"), None);
    }
}
