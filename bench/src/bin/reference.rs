//! The reference server of `bench/run` scenario 3: the practical limit for "HTTP in, one SQLite
//! row out, JSON out". It answers `GET /v1/products/{id}` and `GET /v1/products` (the newest 20
//! active products) from the products service's own database file, opened read-only, with the
//! JSON the gateway writes for the same call (the product's body byte for byte; bench/run checks
//! it). One thread (hyper's HTTP/1 server on a current-thread runtime), one SQLite connection
//! with its statements prepared once.
//!
//!   shopverse-reference --listen 127.0.0.1:PORT --db PATH/products.db

use std::cell::RefCell;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row};

#[derive(Parser)]
#[command(about = "A minimal HTTP/1 server reading products from SQLite: the bench's limit")]
struct Cli {
    #[arg(long)]
    listen: SocketAddr,
    /// The products service's SQLite file.
    #[arg(long)]
    db: String,
}

const COLUMNS: &str = "id, sku, name, description, price_minor, currency, category_id, \
     attributes, image_urls, active, version, created_at, updated_at";

fn main() -> Result<()> {
    let cli = Cli::parse();
    let db = Connection::open_with_flags(
        &cli.db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", cli.db))?;
    db.busy_timeout(std::time::Duration::from_secs(5))?;
    // Prepared once here; `prepare_cached` hands the same statements back per request.
    db.prepare_cached(&by_id_sql())?;
    db.prepare_cached(&newest_sql())?;
    let db = Rc::new(RefCell::new(db));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = tokio::net::TcpListener::bind(cli.listen)
            .await
            .with_context(|| format!("listening on {}", cli.listen))?;
        eprintln!("shopverse-reference: listening on {}", cli.listen);
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let db = db.clone();
            tokio::task::spawn_local(async move {
                let service = service_fn(move |req| {
                    let db = db.clone();
                    async move { Ok::<_, Infallible>(answer(&db.borrow(), &req)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn by_id_sql() -> String {
    format!("SELECT {COLUMNS} FROM products WHERE id = ?1")
}

fn newest_sql() -> String {
    format!(
        "SELECT {COLUMNS} FROM products WHERE active = 1 ORDER BY created_at DESC, id DESC LIMIT 20"
    )
}

fn answer(db: &Connection, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let result = match path.strip_prefix("/v1/products") {
        _ if req.method() != hyper::Method::GET => Err(StatusCode::METHOD_NOT_ALLOWED),
        Some("") => list(db),
        Some(rest) => match rest.strip_prefix('/') {
            Some(id) if !id.is_empty() && !id.contains('/') => one(db, id),
            _ => Err(StatusCode::NOT_FOUND),
        },
        None => Err(StatusCode::NOT_FOUND),
    };
    let (status, body) = match result {
        Ok(body) => (StatusCode::OK, body),
        Err(status) => (status, format!("{{\"code\":{}}}", status.as_u16())),
    };
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    res
}

fn one(db: &Connection, id: &str) -> Result<String, StatusCode> {
    let mut stmt = db
        .prepare_cached(&by_id_sql())
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let mut out = String::with_capacity(1024);
    let found = stmt
        .query_row([id], |row| product_json(row, &mut out))
        .optional()
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    match found {
        Some(true) => Ok(out),
        _ => Err(StatusCode::NOT_FOUND),
    }
}

fn list(db: &Connection) -> Result<String, StatusCode> {
    let mut stmt = db
        .prepare_cached(&newest_sql())
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let mut rows = stmt
        .query([])
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let mut out = String::with_capacity(16 * 1024);
    out.push_str("{\"products\":[");
    let mut first = true;
    while let Some(row) = rows.next().map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)? {
        if !first {
            out.push(',');
        }
        first = false;
        product_json(row, &mut out).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    }
    out.push_str("],\"nextPageToken\":\"\",\"correctedQuery\":\"\",\"facets\":null}");
    Ok(out)
}

/// Writes the product's JSON as the gateway does (proto3 JSON: every field, 64-bit integers
/// as strings, timestamps in RFC 3339); whether it is active (an inactive one is not found).
fn product_json(row: &Row<'_>, out: &mut String) -> rusqlite::Result<bool> {
    let text = |i: usize| -> rusqlite::Result<String> { row.get::<_, String>(i) };
    let active = row.get::<_, i64>(9)? != 0;
    let attributes: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&text(7)?).unwrap_or_default();
    let image_urls: Vec<String> = serde_json::from_str(&text(8)?).unwrap_or_default();
    out.push_str("{\"id\":");
    push_str(out, &text(0)?);
    out.push_str(",\"sku\":");
    push_str(out, &text(1)?);
    out.push_str(",\"name\":");
    push_str(out, &text(2)?);
    out.push_str(",\"description\":");
    push_str(out, &text(3)?);
    let _ = write!(
        out,
        ",\"price\":{{\"amountMinor\":\"{}\",\"currency\":",
        row.get::<_, i64>(4)?
    );
    push_str(out, &text(5)?);
    out.push_str("},\"categoryId\":");
    push_str(
        out,
        row.get::<_, Option<String>>(6)?.as_deref().unwrap_or(""),
    );
    out.push_str(",\"attributes\":{");
    for (i, (k, v)) in attributes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str(out, k);
        out.push(':');
        push_str(out, v);
    }
    out.push_str("},\"imageUrls\":[");
    for (i, u) in image_urls.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str(out, u);
    }
    let _ = write!(
        out,
        "],\"active\":{active},\"version\":\"{}\",\"createdAt\":",
        row.get::<_, i64>(10)?
    );
    push_timestamp(out, row.get(11)?);
    out.push_str(",\"updatedAt\":");
    push_timestamp(out, row.get(12)?);
    out.push('}');
    Ok(active)
}

fn push_str(out: &mut String, s: &str) {
    // serde_json's string escaping, the gateway's too.
    if let Ok(quoted) = serde_json::to_string(s) {
        out.push_str(&quoted);
    }
}

/// Milliseconds since the epoch as proto3 JSON writes a `Timestamp`: UTC, `Z`, and the
/// fraction in 0, 3, 6 or 9 digits (milliseconds here: none or 3).
fn push_timestamp(out: &mut String, ms: i64) {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "\"{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    if milli != 0 {
        let _ = write!(out, ".{milli:03}");
    }
    out.push_str("Z\"");
}

/// Howard Hinnant's days-to-civil: the proleptic Gregorian date of a day count from 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_as_proto3_json() {
        let mut s = String::new();
        push_timestamp(&mut s, 0);
        assert_eq!(s, "\"1970-01-01T00:00:00Z\"");
        s.clear();
        push_timestamp(&mut s, 1_796_688_000_123);
        assert_eq!(s, "\"2026-12-08T00:00:00.123Z\"");
        s.clear();
        push_timestamp(&mut s, 951_825_600_000);
        assert_eq!(s, "\"2000-02-29T12:00:00Z\"");
    }
}
