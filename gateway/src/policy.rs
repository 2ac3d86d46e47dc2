//! The request policy: the rules every request meets before anything of it goes upstream,
//! decided here once, on normalised input, for every path (the HTTP/1 front, Pingora's HTTP/1
//! and HTTP/2 sessions).
//!
//! - [`target`]: the request target in origin form, its path normalised ([`normalize_path`]):
//!   what the route and its access rule are decided on, and what is forwarded.
//! - [`check_head`]: the framing and size rules of an HTTP/1 request head (RFC 9112): one
//!   `Host`, strict `Content-Length`, `Transfer-Encoding` that ends in `chunked` and names no
//!   other coding, the header count and size limits.
//! - [`stays_behind`]: the one table of request headers that never reach an upstream
//!   (hop-by-hop, the identity headers a client claims in any spelling, the request id);
//!   [`strip_request_hop_by_hop`] and [`strip_response_hop_by_hop`] apply it, and the
//!   response's hop-by-hop rules, to Pingora's header maps.
//!
//! A refusal says its status and why; the caller answers it in the gateway's JSON error shape
//! and, for a framing refusal, closes the connection.

use std::borrow::Cow;

use http::StatusCode;
use http::header::{self, HeaderName};
use pingora::http::{RequestHeader, ResponseHeader};

/// Why a request is refused before it goes anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
}

impl Refusal {
    const fn bad(reason: &'static str) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }
}

/// A request target in origin form: the normalised path and the query as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    pub path: Cow<'a, str>,
    pub query: Option<&'a str>,
}

impl Target<'_> {
    /// The target as forwarded: `path[?query]`.
    pub fn origin_form(&self) -> String {
        match self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone().into_owned(),
        }
    }
}

/// The request target of `method` as origin form (RFC 9112 3.2): an origin-form target as it
/// is, an absolute-form one (`http://host/path`) without its scheme and authority; the path
/// normalised. `*` (asterisk form) only for `OPTIONS`; authority form (`CONNECT`) is refused.
pub fn target<'a>(method: &str, raw: &'a str) -> Result<Target<'a>, Refusal> {
    let origin = if raw.starts_with('/') {
        raw
    } else if raw == "*" && method == "OPTIONS" {
        return Ok(Target {
            path: Cow::Borrowed("*"),
            query: None,
        });
    } else if let Some(rest) = strip_scheme(raw) {
        // The authority ends at the first `/`, `?` or `#`; an empty path is `/`.
        match rest.find(['/', '?', '#']) {
            Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
            Some(i) if rest.as_bytes()[i] == b'?' => {
                let query = &rest[i + 1..];
                return Ok(Target {
                    path: Cow::Borrowed("/"),
                    query: Some(query),
                });
            }
            Some(_) => return Err(Refusal::bad("a request target has no fragment")),
            None => "/",
        }
    } else {
        return Err(Refusal::bad(
            "the request target is not in origin or absolute form",
        ));
    };
    let (path, query) = match origin.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (origin, None),
    };
    // `#` is in neither table: a fragment is refused by this check or by the path's.
    if query.is_some_and(|q| q.bytes().any(|b| !is_target_byte(b))) {
        return Err(Refusal::bad("the request target has bytes it may not have"));
    }
    Ok(Target {
        path: normalize_path(path)?,
        query,
    })
}

fn strip_scheme(raw: &str) -> Option<&str> {
    for scheme in ["http://", "https://"] {
        if raw.len() > scheme.len() && raw[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(&raw[scheme.len()..]);
        }
    }
    None
}

/// Bytes a request target may hold as they are (RFC 3986 `pchar`, `/`, `?` and `%`), as a
/// table: it is asked for every byte of every target.
const TARGET_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~!$&'()*+,;=:@/?%";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
};

fn is_target_byte(b: u8) -> bool {
    TARGET_BYTES[usize::from(b)]
}

/// RFC 3986 unreserved: what a percent-encoding of means the same as the byte itself.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Normalises a path (which starts with `/`): percent-encoded unreserved characters decoded,
/// other percent-encodings kept with upper-case digits, `//` collapsed to `/`, dot segments
/// removed (RFC 3986 5.2.4). Refused: an encoded `/`, `\` or NUL, a raw `\`, a byte a path may
/// not hold, a malformed percent-encoding, and a path that climbs above the root.
/// Borrows when the path is already normal, as nearly every path is.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, Refusal> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(Refusal::bad("the path must start with /"));
    }
    // The common case: nothing to decode, no empty or dot segment.
    let mut plain = true;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\\' {
            return Err(Refusal::bad("a path may not hold a backslash"));
        }
        if !is_target_byte(b) || b == b'?' {
            return Err(Refusal::bad("the path has bytes it may not have"));
        }
        if b == b'%' || (b == b'/' && i > 0 && bytes[i - 1] == b'/') {
            plain = false;
        }
        if b == b'.' && (i == 0 || bytes[i - 1] == b'/') {
            let rest = &bytes[i..];
            let seg_end = rest.iter().position(|&c| c == b'/').unwrap_or(rest.len());
            if &rest[..seg_end] == b"." || &rest[..seg_end] == b".." {
                plain = false;
            }
        }
    }
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    // Decode what is unreserved; keep the rest encoded, upper-case.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            decoded.push(char::from(b));
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(Refusal::bad("a malformed percent-encoding in the path"));
        };
        let v = hi * 16 + lo;
        match v {
            b'/' | b'\\' | 0 => {
                return Err(Refusal::bad(
                    "an encoded /, \\ or NUL in the path is refused",
                ));
            }
            v if is_unreserved(v) => decoded.push(char::from(v)),
            v => {
                decoded.push('%');
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(v >> 4)]));
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(v & 15)]));
            }
        }
        i += 3;
    }
    // Segments, with empty and `.` ones dropped and `..` taking the one before it away.
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(Refusal::bad("the path climbs above the root"));
                }
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for seg in &out {
        normal.push('/');
        normal.push_str(seg);
    }
    if trailing || normal.is_empty() {
        normal.push('/');
    }
    Ok(if normal == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(normal)
    })
}

/// What [`check_head`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Framing {
    /// The body's length, from `Content-Length`.
    pub content_length: Option<u64>,
    /// The body is chunked.
    pub chunked: bool,
    /// Both were sent: the chunked framing wins, and the connection closes after the answer
    /// (RFC 9112 6.1: the message may be an attempt at request smuggling).
    pub close_after: bool,
}

/// The limits a head is held to.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// A declared `Content-Length` past this is a 413.
    pub max_body_bytes: usize,
}

/// Checks an HTTP/1 request head: `http11` for version 1.1, the headers as sent (name, value).
pub fn check_head<'h>(
    http11: bool,
    headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
    limits: HeadLimits,
) -> Result<Framing, Refusal> {
    let mut f = Framing::default();
    let (mut hosts, mut count, mut bytes) = (0usize, 0usize, 0usize);
    let mut te = false;
    for (name, value) in headers {
        count += 1;
        bytes += name.len() + value.len() + 4;
        // By length first: most names are none of these three.
        if !matches!(name.len(), 4 | 14 | 17) {
            continue;
        }
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = content_length(value)?;
            if f.content_length.is_some_and(|m| m != n) {
                return Err(Refusal::bad("Content-Length values differ"));
            }
            f.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if coding.is_empty() {
                    continue;
                }
                if !coding.eq_ignore_ascii_case(b"chunked") {
                    return Err(Refusal {
                        status: StatusCode::NOT_IMPLEMENTED,
                        reason: "a transfer coding other than chunked",
                    });
                }
                if f.chunked {
                    return Err(Refusal::bad("chunked twice in Transfer-Encoding"));
                }
                f.chunked = true;
            }
            te = true;
        }
    }
    sizes(count, bytes, limits)?;
    if http11 && hosts != 1 {
        return Err(Refusal::bad("an HTTP/1.1 request has exactly one Host"));
    }
    if !http11 && hosts > 1 {
        return Err(Refusal::bad("more than one Host"));
    }
    if te && !f.chunked {
        return Err(Refusal::bad("Transfer-Encoding names no coding"));
    }
    if te && !http11 {
        return Err(Refusal::bad("Transfer-Encoding in an HTTP/1.0 request"));
    }
    if f.content_length
        .is_some_and(|n| n > u64::try_from(limits.max_body_bytes).unwrap_or(u64::MAX))
    {
        return Err(Refusal {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            reason: "the request body is too large",
        });
    }
    if f.chunked && f.content_length.is_some() {
        f.content_length = None;
        f.close_after = true;
    }
    Ok(f)
}

/// The size limits alone, for requests whose framing is not HTTP/1's (HTTP/2).
pub fn check_size<'h>(
    headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
    limits: HeadLimits,
) -> Result<(), Refusal> {
    let (count, bytes) = headers
        .into_iter()
        .fold((0, 0), |(c, b), (n, v)| (c + 1, b + n.len() + v.len() + 4));
    sizes(count, bytes, limits)
}

/// Names and values count as the bytes they take in an HTTP/1 head (`name: value\r\n`).
fn sizes(count: usize, bytes: usize, limits: HeadLimits) -> Result<(), Refusal> {
    if count > limits.max_headers || bytes > limits.max_header_bytes {
        return Err(Refusal {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            reason: "too many or too large request headers",
        });
    }
    Ok(())
}

/// A `Content-Length` value: `1*DIGIT`, or a list of equal ones (RFC 9110 8.6), with only
/// spaces and tabs around them; a value past `u64` is refused.
pub fn content_length(value: &[u8]) -> Result<u64, Refusal> {
    let bad = || Refusal::bad("Content-Length is not a number");
    let mut n = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) || part.len() > 19 {
            return Err(bad());
        }
        let v = part
            .iter()
            .try_fold(0u64, |n, d| {
                n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            })
            .ok_or_else(bad)?;
        if n.is_some_and(|m| m != v) {
            return Err(Refusal::bad("Content-Length values differ"));
        }
        n = Some(v);
    }
    n.ok_or_else(bad)
}

/// Whether a request header stays behind at the gateway: hop-by-hop (RFC 9110 7.6.1), the
/// request id (the gateway sets its own), and the identity headers in any spelling a server
/// behind may read as them (`_` for `-`: CGI and WSGI map both to the same variable).
pub fn stays_behind(name: &[u8]) -> bool {
    // By length first: it runs for every header of every request.
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    match name.len() {
        2 => is(b"te"),
        7 => is(b"trailer") || is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        12 => is(b"x-request-id"),
        16 => is(b"proxy-connection") || is_identity(name),
        17 => is(b"transfer-encoding") || is_identity(name),
        19 => is(b"proxy-authorization") || is_identity(name),
        _ => is_identity(name),
    }
}

/// `x-shopverse-*`, whatever its case and whether it is spelt with `-` or `_`: the gateway's
/// own metadata, never a client's.
pub fn is_identity(name: &[u8]) -> bool {
    const PREFIX: &[u8] = b"x-shopverse-";
    name.len() > PREFIX.len()
        && name[..PREFIX.len()]
            .iter()
            .zip(PREFIX)
            .all(|(a, b)| a.eq_ignore_ascii_case(b) || (*a == b'_' && *b == b'-'))
}

/// The names a `Connection` header lists that are removed with it: any but `Host` (which
/// frames the request) and the tokens `close` and `keep-alive`.
pub fn nominated(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"host")
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
        })
}

/// Methods a client may send again on its own (RFC 9110 9.2.2): the only ones the gateway
/// retries on a new upstream connection.
pub fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

// The same rules on Pingora's header maps, for the requests Pingora's server parsed.

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Header names a `Connection` header lists (at most a few are honoured), as
/// [`nominated`] reads them: never `Host`.
fn nominated_names(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| nominated(v.as_bytes()))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .take(16)
        .collect()
}

/// Hop-by-hop response headers besides the ones `Connection` names (`Transfer-Encoding`
/// stays: it says how the body is framed).
static RESPONSE_HOP: [&HeaderName; 6] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::TRAILER,
    &header::UPGRADE,
];

/// One pass over the names (most requests have none of these), instead of a lookup per name.
fn any_of(headers: &http::HeaderMap, names: &[&HeaderName]) -> bool {
    headers.keys().any(|k| names.contains(&k))
}

/// `Connection: keep-alive` or `close` is the only one of `hop` present.
fn plain_connection_only(headers: &http::HeaderMap, hop: &[&HeaderName]) -> bool {
    let mut values = headers.get_all(header::CONNECTION).iter();
    let plain = match (values.next(), values.next()) {
        (Some(v), None) => {
            v.as_bytes().eq_ignore_ascii_case(b"keep-alive")
                || v.as_bytes().eq_ignore_ascii_case(b"close")
        }
        _ => false,
    };
    plain
        && !headers
            .keys()
            .any(|k| *k != header::CONNECTION && hop.contains(&k))
}

/// Removes the request headers that stay behind: [`stays_behind`] (the table
/// the HTTP/1 front uses too) and the ones `Connection` names.
pub fn strip_request_hop_by_hop(req: &mut RequestHeader) {
    let behind = |k: &HeaderName| stays_behind(k.as_str().as_bytes());
    if !req.headers.keys().any(behind) {
        return;
    }
    let mut names = nominated_names(&req.headers);
    names.extend(req.headers.keys().filter(|k| behind(k)).cloned());
    for name in names {
        req.remove_header(&name);
    }
}

/// The upstream's connection headers are its own; Pingora writes the client's
/// `Connection` itself.
pub fn strip_response_hop_by_hop(resp: &mut ResponseHeader) {
    if !any_of(&resp.headers, &RESPONSE_HOP) {
        return;
    }
    if plain_connection_only(&resp.headers, &RESPONSE_HOP) {
        // The usual case, `Connection: keep-alive` and nothing else: one removal.
        resp.remove_header(&header::CONNECTION);
        return;
    }
    for name in nominated_names(&resp.headers) {
        if name != header::TRANSFER_ENCODING {
            resp.remove_header(&name);
        }
    }
    for name in RESPONSE_HOP {
        resp.remove_header(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, StatusCode> {
        normalize_path(p).map(Cow::into_owned).map_err(|r| r.status)
    }

    #[test]
    fn paths_normalise_as_rfc_3986_says() {
        for (raw, want) in [
            ("/", "/"),
            ("/static/a", "/static/a"),
            ("/static/x/../admin/secret", "/static/admin/secret"),
            ("/static/../admin/secret", "/admin/secret"),
            ("/static/%61dmin/secret", "/static/admin/secret"),
            ("/static//admin/secret", "/static/admin/secret"),
            ("/static/./admin/secret", "/static/admin/secret"),
            ("/static/%2e%2e/admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/", "/a/"),
            ("//", "/"),
            ("/a%20b", "/a%20b"),
            ("/a%3f", "/a%3F"),
            ("/%7euser", "/~user"),
            ("/..a/b.", "/..a/b."),
        ] {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
        for raw in [
            "/..", "/a/../..", "/%2e%2e", "/a%2fb", "/a%2Fb", "/a%5cb", "/a%00", "/a\\b", "/a%zz",
            "/a%2", "/a b", "/a\u{e9}", "a",
        ] {
            assert_eq!(norm(raw), Err(StatusCode::BAD_REQUEST), "{raw}");
        }
        assert!(matches!(
            normalize_path("/static/a/b").unwrap(),
            Cow::Borrowed(_)
        ));
    }

    /// A naive resolver, written apart from `normalize_path`: decode every unreserved
    /// escape, then walk the segments with a stack.
    fn reference(path: &str) -> Option<String> {
        let mut decoded = String::new();
        let b = path.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                let v = u8::from_str_radix(path.get(i + 1..i + 3)?, 16).ok()?;
                if v == b'/' || v == b'\\' || v == 0 {
                    return None;
                }
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    decoded.push(char::from(v));
                } else {
                    decoded.push_str(&format!("%{v:02X}"));
                }
                i += 3;
            } else {
                decoded.push(char::from(b[i]));
                i += 1;
            }
        }
        let mut stack: Vec<&str> = Vec::new();
        let segs: Vec<&str> = decoded.split('/').skip(1).collect();
        for s in &segs {
            match *s {
                "" | "." => {}
                ".." => {
                    stack.pop()?;
                }
                s => stack.push(s),
            }
        }
        let last = segs.last().copied().unwrap_or("");
        let mut out: String = stack.iter().map(|s| format!("/{s}")).collect();
        if out.is_empty() || matches!(last, "" | "." | "..") {
            out.push('/');
        }
        Some(out)
    }

    #[test]
    fn normal_paths_are_fixed_points_and_agree_with_a_naive_resolver() {
        const PIECES: [&str; 14] = [
            "/", "a", "b", ".", "..", "%2e", "%2E", "%61", "%2f", "%20", "%3F", "~", "%", "//",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..50_000 {
            let mut p = String::from("/");
            for _ in 0..next(10) {
                p.push_str(PIECES[next(PIECES.len() as u64) as usize]);
            }
            let got = normalize_path(&p).ok().map(Cow::into_owned);
            assert_eq!(got, reference(&p), "{p}");
            if let Some(n) = got {
                assert_eq!(
                    normalize_path(&n).map(Cow::into_owned),
                    Ok(n.clone()),
                    "{p} -> {n}"
                );
                assert!(
                    !n.contains("//") && !n.contains("/./") && !n.contains("/../"),
                    "{n}"
                );
                assert!(
                    !n.to_ascii_lowercase().contains("%2e") && !n.contains("%61"),
                    "{n}"
                );
            }
        }
    }

    #[test]
    fn targets_in_absolute_form_become_origin_form() {
        let t = target("GET", "http://evil.example/static/a?x=1").unwrap();
        assert_eq!(t.origin_form(), "/static/a?x=1");
        assert_eq!(target("GET", "HTTP://h").unwrap().origin_form(), "/");
        assert_eq!(target("GET", "http://h?q").unwrap().origin_form(), "/?q");
        assert_eq!(target("OPTIONS", "*").unwrap().origin_form(), "*");
        assert!(target("GET", "*").is_err());
        assert!(target("CONNECT", "h:443").is_err());
        assert!(target("GET", "/a#frag").is_err());
        let t = target("GET", "/a/./b?q=/../").unwrap();
        assert_eq!(t.origin_form(), "/a/b?q=/../", "the query is not a path");
    }

    fn head(raw: &[(&str, &str)]) -> Result<Framing, StatusCode> {
        let limits = HeadLimits {
            max_headers: 10,
            max_header_bytes: 1000,
            max_body_bytes: 100,
        };
        check_head(
            true,
            raw.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
            limits,
        )
        .map_err(|r| r.status)
    }

    /// The framing rules read independently from RFC 9112, over whole heads: what
    /// [`check_head`] must decide. `Ok((content_length, chunked, close_after))`, or the
    /// statuses the head deserves (one per rule it breaks; the check may name any of them).
    fn reference_framing(
        http11: bool,
        headers: &[(&str, &str)],
        limits: HeadLimits,
    ) -> Result<(Option<u64>, bool, bool), Vec<u16>> {
        let mut broken = Vec::new();
        fn named<'h>(
            headers: &'h [(&'h str, &'h str)],
            n: &'static str,
        ) -> impl Iterator<Item = &'h (&'h str, &'h str)> {
            headers
                .iter()
                .filter(move |(k, _)| k.eq_ignore_ascii_case(n))
        }
        let hosts = named(headers, "host").count();
        if (http11 && hosts != 1) || hosts > 1 {
            broken.push(400);
        }
        let mut lengths = Vec::new();
        for (_, v) in named(headers, "content-length") {
            for part in v.split(',') {
                let part = part.trim_matches([' ', '\t']);
                match part.parse::<u64>() {
                    // Past 19 digits a length is beyond what a server can represent: 400
                    // (nginx) or 413 are both a refusal of it.
                    Ok(_) if part.len() > 19 => broken.extend([400, 413]),
                    Ok(n) if part.bytes().all(|b| b.is_ascii_digit()) => lengths.push(n),
                    _ => broken.push(400),
                }
            }
        }
        if lengths.windows(2).any(|w| w[0] != w[1]) {
            broken.push(400);
        }
        let codings: Vec<String> = named(headers, "transfer-encoding")
            .flat_map(|(_, v)| v.split(','))
            .map(|c| c.trim_matches([' ', '\t']).to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect();
        let te = named(headers, "transfer-encoding").count() > 0;
        if codings.iter().any(|c| c != "chunked") {
            broken.push(501);
        }
        if codings.iter().filter(|c| *c == "chunked").count() > 1 || (te && codings.is_empty()) {
            broken.push(400);
        }
        if te && !http11 {
            broken.push(400);
        }
        let bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        if headers.len() > limits.max_headers || bytes > limits.max_header_bytes {
            broken.push(431);
        }
        let length = lengths.first().copied();
        if length.is_some_and(|n| n > limits.max_body_bytes as u64) {
            broken.push(413);
        }
        if !broken.is_empty() {
            return Err(broken);
        }
        let chunked = te;
        Ok((
            length.filter(|_| !chunked),
            chunked,
            chunked && length.is_some(),
        ))
    }

    /// Random heads built from the spellings smuggling attempts use (case, signs, lists, bare
    /// commas, codings, duplicates, limits): [`check_head`] accepts exactly the heads the
    /// reference accepts, with the same framing, and refuses the others with a status the
    /// reference names.
    #[test]
    fn request_heads_agree_with_an_independent_reading() {
        const NAMES: [&str; 8] = [
            "Host",
            "host",
            "Content-Length",
            "content-LENGTH",
            "Transfer-Encoding",
            "transfer-encoding",
            "X-Other",
            "Content-Lengthx",
        ];
        const VALUES: [&str; 24] = [
            "a",
            "3",
            "03",
            " 3 ",
            "\t3",
            "+3",
            "-3",
            "3,3",
            "3, 3",
            "3,4",
            ",3",
            "",
            "0x3",
            "18446744073709551615",
            "18446744073709551616",
            "chunked",
            "Chunked",
            " chunked ",
            "gzip, chunked",
            "chunked, chunked",
            "chunked,",
            "identity",
            ",",
            "3 3",
        ];
        let limits = HeadLimits {
            max_headers: 6,
            max_header_bytes: 160,
            max_body_bytes: 1000,
        };
        let mut seed = 0x0123_4567_89ab_cdef_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut accepted, mut refused) = (0, 0);
        for _ in 0..50_000 {
            let http11 = next(4) != 0;
            let mut headers = Vec::new();
            if next(8) != 0 {
                headers.push(("Host", "a"));
            }
            for _ in 0..next(6) {
                headers.push((NAMES[next(NAMES.len())], VALUES[next(VALUES.len())]));
            }
            let got = check_head(
                http11,
                headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
                limits,
            );
            match (got, reference_framing(http11, &headers, limits)) {
                (Ok(f), Ok((length, chunked, close))) => {
                    accepted += 1;
                    assert_eq!(
                        (f.content_length, f.chunked, f.close_after),
                        (length, chunked, close),
                        "{http11} {headers:?}"
                    );
                }
                (Err(r), Err(statuses)) => {
                    refused += 1;
                    assert!(
                        statuses.contains(&r.status.as_u16()),
                        "{http11} {headers:?}: {} for {statuses:?}",
                        r.status
                    );
                }
                (got, want) => panic!("{http11} {headers:?}: {got:?}, the reference: {want:?}"),
            }
        }
        // Both sides of the rule were exercised, many times.
        assert!(accepted > 5_000 && refused > 5_000, "{accepted} {refused}");
    }

    #[test]
    fn request_heads_are_framed_strictly() {
        let h = ("Host", "a");
        assert_eq!(head(&[h]).map(|f| f.content_length), Ok(None));
        assert_eq!(
            head(&[h, ("Content-Length", " 42 ")]).map(|f| f.content_length),
            Ok(Some(42))
        );
        assert_eq!(
            head(&[h, ("Content-Length", "42, 42"), ("content-length", "42")])
                .map(|f| f.content_length),
            Ok(Some(42))
        );
        for bad in [
            "+3",
            "-1",
            "3 4",
            "0x5",
            "",
            "99999999999999999999",
            "4\u{a0}",
            "42, 43",
        ] {
            assert_eq!(
                head(&[h, ("Content-Length", bad)]),
                Err(StatusCode::BAD_REQUEST),
                "{bad:?}"
            );
        }
        assert_eq!(
            head(&[h, ("Content-Length", "3"), ("Content-Length", "4")]),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            head(&[h, ("Content-Length", "101")]),
            Err(StatusCode::PAYLOAD_TOO_LARGE)
        );
        assert_eq!(head(&[]), Err(StatusCode::BAD_REQUEST), "no Host");
        assert_eq!(head(&[h, ("host", "b")]), Err(StatusCode::BAD_REQUEST));
        let chunked = head(&[h, ("Transfer-Encoding", "chunked")]).unwrap();
        assert!(chunked.chunked && !chunked.close_after);
        let both = head(&[h, ("Content-Length", "5"), ("Transfer-Encoding", "chunked")]).unwrap();
        assert!(both.chunked && both.close_after && both.content_length.is_none());
        assert_eq!(
            head(&[h, ("Transfer-Encoding", "gzip, chunked")]),
            Err(StatusCode::NOT_IMPLEMENTED)
        );
        assert_eq!(
            head(&[h, ("Transfer-Encoding", "chunked, chunked")]),
            Err(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            head(&[h, ("Transfer-Encoding", "")]),
            Err(StatusCode::BAD_REQUEST)
        );
        let many: Vec<(&str, &str)> = std::iter::once(h).chain([("x", "1"); 10]).collect();
        assert_eq!(
            head(&many),
            Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        let big = "v".repeat(1000);
        assert_eq!(
            head(&[h, ("x", big.as_str())]),
            Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }

    #[test]
    fn identity_headers_stay_behind_in_every_spelling() {
        for name in [
            "X-Shopverse-User",
            "x-shopverse-roles",
            "X_Shopverse_User",
            "x_shopverse-roles",
            "Connection",
            "TE",
            "x-request-id",
        ] {
            assert!(stays_behind(name.as_bytes()), "{name}");
        }
        for name in [
            "Host",
            "Authorization",
            "x-shopverse",
            "x-forwarded-for",
            "Content-Length",
        ] {
            assert!(!stays_behind(name.as_bytes()), "{name}");
        }
        let named: Vec<&[u8]> = nominated(b"close, Host, x-secret ,keep-alive").collect();
        assert_eq!(named, [&b"x-secret"[..]]);
    }
}

#[cfg(test)]
mod hop_by_hop_tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("connection", "keep-alive, x-secret")
            .unwrap();
        req.insert_header("x-secret", "1").unwrap();
        req.insert_header("keep-alive", "timeout=5").unwrap();
        req.insert_header("te", "trailers").unwrap();
        req.insert_header("upgrade", "h2c").unwrap();
        req.insert_header("x_shopverse_user", "mallory").unwrap();
        req.insert_header("accept", "*/*").unwrap();
        strip_request_hop_by_hop(&mut req);
        let names: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept"]);

        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("connection", "close").unwrap();
        resp.insert_header("keep-alive", "timeout=5").unwrap();
        resp.insert_header("transfer-encoding", "chunked").unwrap();
        strip_response_hop_by_hop(&mut resp);
        let names: Vec<&str> = resp.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["transfer-encoding"]);

        // The shortcut for a lone `Connection: keep-alive` leaves the rest alone...
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("connection", "keep-alive").unwrap();
        resp.insert_header("content-length", "2").unwrap();
        strip_response_hop_by_hop(&mut resp);
        let names: Vec<&str> = resp.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-length"]);
        // ...and is not taken when another hop-by-hop header is there too.
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("connection", "close").unwrap();
        req.insert_header("te", "trailers").unwrap();
        req.insert_header("proxy-authorization", "Basic eA==")
            .unwrap();
        strip_request_hop_by_hop(&mut req);
        assert!(req.headers.is_empty(), "{:?}", req.headers);
    }
}
