//! The access log's line, formatted by hand: the gateway writes one per request, and going
//! through `tracing`'s formatter (a visitor, a JSON map, a formatted timestamp) cost a third of
//! the plain route's throughput. The line has the shape `tracing`'s own lines have in the same
//! format (JSON: `timestamp`, `level`, `fields`, `target`), so log shippers read both alike; it
//! goes to the same writing thread ([`shopverse_kit::telemetry::line_sink`]).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shopverse_kit::telemetry::LineSink;

use crate::gateway::Access;
use crate::reply::decimal;

/// What every line says besides [`Access`].
pub(crate) struct Line<'a> {
    pub route: &'a str,
    pub method: &'a str,
    pub status: &'a str,
    pub elapsed: Duration,
    pub trace_id: Option<&'a str>,
}

thread_local! {
    static BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Formats the line into a buffer of this thread's and hands it to `sink`. Without one (the
/// gateway in a program that installed its own subscriber), the plain line goes through
/// `tracing` as the message of an event of target `shopverse::access`.
pub(crate) fn write(sink: Option<&LineSink>, line: &Line<'_>, access: &Access<'_>) {
    BUF.with(|b| {
        let Ok(mut buf) = b.try_borrow_mut() else {
            return;
        };
        buf.clear();
        match sink {
            Some(sink) => {
                if sink.json() {
                    json(&mut buf, sink.timestamps(), line, access);
                } else {
                    human(&mut buf, sink.timestamps(), line, access);
                }
                buf.push('\n');
                sink.write(buf.as_bytes());
            }
            None => {
                human(&mut buf, false, line, access);
                let fields = buf.split_once(": ").map_or(buf.as_str(), |(_, f)| f);
                tracing::info!(target: "shopverse::access", "{fields}");
            }
        }
    });
}

/// `2026-12-07T15:04:05.123456Z`. The part up to the seconds is made once a second.
fn timestamp(out: &mut String, now: SystemTime) {
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil_from_days(days as i64);
        let mut s = String::with_capacity(19);
        let _ = write!(
            s,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
        );
        // A year past 9999 does not fit: written out, not cached.
        match <[u8; 19]>::try_from(s.as_bytes()) {
            Ok(t) => {
                text = t;
                SECOND.set((secs, t));
            }
            Err(_) => {
                out.push_str(&s);
                push_fraction(out, since.subsec_micros());
                return;
            }
        }
    }
    // The cached text is ASCII, written above.
    out.push_str(std::str::from_utf8(&text).unwrap_or_default());
    push_fraction(out, since.subsec_micros());
}

/// `.123456Z`.
fn push_fraction(out: &mut String, micros: u32) {
    let mut digits = *b".000000Z";
    let mut n = micros;
    for d in digits[1..7].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.push_str(std::str::from_utf8(&digits).unwrap_or_default());
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Whether `value` goes into a JSON string as it is.
fn plain(value: &str) -> bool {
    value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// `value` as a JSON string, quotes included.
fn json_str(out: &mut String, value: &str) {
    out.push('"');
    if plain(value) {
        out.push_str(value);
    } else {
        for c in value.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => out.push(c),
            }
        }
    }
    out.push('"');
}

fn push_number(out: &mut String, n: u64) {
    let mut digits = [0; 20];
    out.push_str(std::str::from_utf8(decimal(n, &mut digits)).unwrap_or_default());
}

/// An address the way `Display` writes it, without the formatting machinery for IPv4.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_number(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `upstream` written as a JSON string.
fn json_display(out: &mut String, value: &dyn std::fmt::Display) {
    let at = out.len();
    let _ = write!(out, "{value}");
    if !plain(&out[at..]) {
        let written = out.split_off(at);
        json_str(out, &written);
        return;
    }
    out.insert(at, '"');
    out.push('"');
}

fn json(out: &mut String, timestamps: bool, line: &Line<'_>, a: &Access<'_>) {
    out.push('{');
    if timestamps {
        out.push_str("\"timestamp\":\"");
        timestamp(out, SystemTime::now());
        out.push_str("\",");
    }
    out.push_str("\"level\":\"INFO\",\"fields\":{\"request_id\":");
    json_str(out, a.request_id);
    if let Some(t) = line.trace_id {
        out.push_str(",\"trace_id\":");
        json_str(out, t);
    }
    if let Some(ip) = a.client {
        out.push_str(",\"client\":\"");
        push_ip(out, ip);
        out.push('"');
    }
    out.push_str(",\"method\":");
    json_str(out, line.method);
    out.push_str(",\"path\":");
    json_str(out, a.path);
    out.push_str(",\"route\":");
    json_str(out, line.route);
    out.push_str(",\"status\":");
    json_str(out, line.status);
    for (key, v) in [
        (",\"bytes_in\":", a.bytes_in),
        (",\"bytes_out\":", a.bytes_out),
    ] {
        if let Some(v) = v {
            out.push_str(key);
            push_number(out, v);
        }
    }
    out.push_str(",\"duration_us\":");
    push_number(out, line.elapsed.as_micros() as u64);
    if let Some(u) = a.upstream {
        out.push_str(",\"upstream\":");
        json_display(out, u);
    }
    if let Some(c) = a.cache {
        out.push_str(",\"cache\":");
        json_str(out, c);
    }
    if let Some(i) = a.identity {
        out.push_str(",\"user\":");
        json_str(out, &i.user_id);
    }
    out.push_str("},\"target\":\"shopverse::access\"}");
}

fn human(out: &mut String, timestamps: bool, line: &Line<'_>, a: &Access<'_>) {
    if timestamps {
        timestamp(out, SystemTime::now());
        out.push(' ');
    }
    let _ = write!(
        out,
        " INFO shopverse::access: request_id={} method={} path={} route={} status={}",
        a.request_id, line.method, a.path, line.route, line.status
    );
    if let Some(t) = line.trace_id {
        let _ = write!(out, " trace_id={t}");
    }
    if let Some(ip) = a.client {
        let _ = write!(out, " client={ip}");
    }
    for (key, v) in [("bytes_in", a.bytes_in), ("bytes_out", a.bytes_out)] {
        if let Some(v) = v {
            let _ = write!(out, " {key}={v}");
        }
    }
    let _ = write!(out, " duration_us={}", line.elapsed.as_micros());
    if let Some(u) = a.upstream {
        let _ = write!(out, " upstream={u}");
    }
    for (key, v) in [
        ("cache", a.cache),
        ("user", a.identity.map(|i| i.user_id.as_str())),
    ] {
        if let Some(v) = v {
            let _ = write!(out, " {key}={v}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_are_rfc_3339_utc() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_429), (2025, 12, 7));
        let mut s = String::new();
        timestamp(
            &mut s,
            UNIX_EPOCH + Duration::from_micros(1_765_119_845_123_456),
        );
        assert_eq!(s, "2025-12-07T15:04:05.123456Z");
    }

    #[test]
    fn a_json_line_is_valid_json_whatever_the_client_sent() {
        let a = Access {
            request_id: "a\"b\\c\u{1}",
            path: "/x\"y",
            ..Default::default()
        };
        let line = Line {
            route: "/x",
            method: "GET",
            status: "200",
            elapsed: Duration::from_micros(42),
            trace_id: None,
        };
        let mut s = String::new();
        json(&mut s, true, &line, &a);
        let v: serde_json::Value = serde_json::from_str(&s).expect("valid JSON");
        assert_eq!(v["fields"]["request_id"], "a\"b\\c\u{1}");
        assert_eq!(v["fields"]["path"], "/x\"y");
        assert_eq!(v["fields"]["duration_us"], 42);
        assert_eq!(v["target"], "shopverse::access");
    }

    /// Pseudo-random field values (quotes, backslashes, control characters, non-ASCII, IPv4
    /// and IPv6 clients, odd upstream texts, times across the years): every line is one JSON
    /// object whose fields read back as they were given.
    #[test]
    fn every_line_reads_back_as_json_with_the_values_given() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        const PIECES: [&str; 12] = [
            "a", "/", "\"", "\\", "\u{1}", "\n", "\u{7f}", "é", "🛒", " ", "%2F", "0",
        ];
        let text = |next: &mut dyn FnMut(u64) -> u64| {
            (0..next(6))
                .map(|_| PIECES[next(12) as usize])
                .collect::<String>()
        };
        for _ in 0..5_000 {
            let (request_id, path, user, upstream) = (
                text(&mut next),
                text(&mut next),
                text(&mut next),
                text(&mut next),
            );
            let client: IpAddr = if next(2) == 0 {
                std::net::Ipv4Addr::from(next(u64::from(u32::MAX)) as u32).into()
            } else {
                std::net::Ipv6Addr::from(u128::from(next(u64::MAX)) << 64 | 1).into()
            };
            let identity = shopverse_kit::Identity {
                user_id: user.clone(),
                roles: Vec::new(),
            };
            let a = Access {
                request_id: &request_id,
                path: &path,
                client: Some(client),
                bytes_in: Some(next(u64::MAX)),
                bytes_out: (next(2) == 0).then(|| next(10)),
                upstream: Some(&upstream),
                cache: Some("HIT"),
                identity: Some(&identity),
                ..Default::default()
            };
            let elapsed = Duration::from_micros(next(10_000_000_000));
            let line = Line {
                route: "/v1/products/{id}",
                method: "GET",
                status: "200",
                elapsed,
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            };
            let micros = next(253_402_300_799_000_000);
            let now = UNIX_EPOCH + Duration::from_micros(micros);
            let mut s = String::new();
            json(&mut s, false, &line, &a);
            let v: serde_json::Value = serde_json::from_str(&s).expect(&s);
            let f = &v["fields"];
            assert_eq!(f["request_id"], request_id.as_str(), "{s}");
            assert_eq!(f["path"], path.as_str(), "{s}");
            assert_eq!(f["user"], user.as_str(), "{s}");
            assert_eq!(f["upstream"], upstream.as_str(), "{s}");
            assert_eq!(f["client"], client.to_string(), "{s}");
            assert_eq!(f["bytes_in"], a.bytes_in.unwrap_or_default(), "{s}");
            assert_eq!(f["bytes_out"].as_u64(), a.bytes_out, "{s}");
            assert_eq!(f["duration_us"], elapsed.as_micros() as u64, "{s}");
            let mut t = String::new();
            timestamp(&mut t, now);
            let secs = micros / 1_000_000;
            let (y, m, d) = civil_from_days((secs / 86_400) as i64);
            let rem = secs % 86_400;
            let want = format!(
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
                rem / 3600,
                rem / 60 % 60,
                rem % 60,
                micros % 1_000_000
            );
            assert_eq!(t, want);
        }
    }
}
