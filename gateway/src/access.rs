//! The access log's line, formatted by hand: the gateway writes one per request, and going
//! through `tracing`'s formatter (a visitor, a JSON map, a formatted timestamp) cost a third of
//! the plain route's throughput. The line has the shape `tracing`'s own lines have in the same
//! format (JSON: `timestamp`, `level`, `fields`, `target`), so log shippers read both alike; it
//! goes to the same writing thread ([`shopverse_kit::telemetry::line_sink`]).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shopverse_kit::telemetry::LineSink;

use crate::gateway::Access;

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

/// `2026-12-07T15:04:05.123456Z`.
fn timestamp(out: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_micros()
    );
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

/// `value` as a JSON string, quotes included.
fn json_str(out: &mut String, value: &str) {
    out.push('"');
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
    let text = |out: &mut String, key: &str, v: Option<&str>| {
        if let Some(v) = v {
            let _ = write!(out, ",\"{key}\":");
            json_str(out, v);
        }
    };
    let number = |out: &mut String, key: &str, v: Option<u64>| {
        if let Some(v) = v {
            let _ = write!(out, ",\"{key}\":{v}");
        }
    };
    text(out, "trace_id", line.trace_id);
    if let Some(ip) = a.client {
        let _ = write!(out, ",\"client\":\"{ip}\"");
    }
    text(out, "method", Some(line.method));
    text(out, "path", Some(a.path));
    text(out, "route", Some(line.route));
    text(out, "status", Some(line.status));
    number(out, "bytes_in", a.bytes_in);
    number(out, "bytes_out", a.bytes_out);
    number(out, "duration_us", Some(line.elapsed.as_micros() as u64));
    if let Some(u) = a.upstream {
        out.push_str(",\"upstream\":");
        json_str(out, &u.to_string());
    }
    text(out, "cache", a.cache);
    text(out, "user", a.identity.map(|i| i.user_id.as_str()));
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
}
