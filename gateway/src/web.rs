//! The storefront and the operations console: static files built into the binary and served at
//! `/` (the page) and `/assets/<name>.<hash>.<ext>` (everything it loads).
//!
//! Each asset's URL carries the first 16 hex digits of its SHA-256, so it is cached for a year
//! (`immutable`); the page names them and is revalidated on every load (`no-cache` with an
//! ETag). Every file is kept plain and gzip-compressed, compressed once at start-up. The
//! Content-Security-Policy allows scripts, styles and connections to this origin only, no
//! inline script or style, no frames: the appliance works with no internet access, and nothing
//! loads from anywhere else.

use std::collections::HashMap;
use std::io::Write;

use bytes::Bytes;
use http::StatusCode;
use sha2::Digest;

/// The policy every page and asset is served with.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The files, by their source name.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/app.js"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/console.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../web/style.css"),
    ),
];
const INDEX: &str = include_str!("../web/index.html");

/// One file as served.
pub struct Asset {
    pub content_type: &'static str,
    pub etag: String,
    pub plain: Bytes,
    pub gzip: Bytes,
    /// `immutable` for a fingerprinted asset, revalidated for the page.
    pub immutable: bool,
}

impl Asset {
    fn new(content_type: &'static str, body: Vec<u8>, immutable: bool) -> (String, Asset) {
        let hash = sha2::Sha256::digest(&body);
        let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        // Writing to a Vec cannot fail.
        let gzip = gz
            .write_all(&body)
            .and_then(|()| gz.finish())
            .unwrap_or_default();
        let asset = Asset {
            content_type,
            etag: format!("\"{hex}\""),
            plain: Bytes::from(body),
            gzip: Bytes::from(gzip),
            immutable,
        };
        (hex, asset)
    }
}

/// The built-in site.
pub struct Web {
    by_path: HashMap<String, Asset>,
}

impl Default for Web {
    fn default() -> Self {
        Self::new()
    }
}

impl Web {
    /// Fingerprints and compresses the files, and writes their URLs into the page.
    pub fn new() -> Web {
        let mut by_path = HashMap::new();
        let mut index = INDEX.to_owned();
        for (name, content_type, body) in FILES {
            let (hash, asset) = Asset::new(content_type, body.to_vec(), true);
            let (stem, ext) = name.rsplit_once('.').unwrap_or((name, ""));
            let url = format!("/assets/{stem}.{hash}.{ext}");
            index = index.replace(&format!("{{{{{name}}}}}"), &url);
            by_path.insert(url, asset);
        }
        let (_, page) = Asset::new("text/html; charset=utf-8", index.into_bytes(), false);
        by_path.insert("/".to_owned(), page);
        Web { by_path }
    }

    /// The asset at `path`, if there is one.
    pub fn get(&self, path: &str) -> Option<&Asset> {
        self.by_path.get(path)
    }

    /// The URLs served, the page first.
    pub fn paths(&self) -> Vec<&str> {
        let mut all: Vec<&str> = self.by_path.keys().map(String::as_str).collect();
        all.sort_by_key(|p| (*p != "/", *p));
        all
    }
}

/// Whether a request's `Accept-Encoding` takes gzip (`gzip;q=0` refuses it).
pub fn accepts_gzip(accept_encoding: Option<&str>) -> bool {
    accept_encoding.is_some_and(|v| {
        v.split(',').any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
    })
}

/// The answer for `asset`: status, headers and body (empty for a 304).
pub fn answer(
    asset: &Asset,
    gzip: bool,
    if_none_match: Option<&str>,
) -> (StatusCode, Vec<(&'static str, String)>, Bytes) {
    let mut headers = vec![
        ("content-type", asset.content_type.to_owned()),
        ("etag", asset.etag.clone()),
        (
            "cache-control",
            if asset.immutable {
                "public, max-age=31536000, immutable".to_owned()
            } else {
                "no-cache".to_owned()
            },
        ),
        ("vary", "accept-encoding".to_owned()),
        ("content-security-policy", CSP.to_owned()),
    ];
    headers.extend(
        crate::reply::SECURITY_HEADERS
            .iter()
            .map(|(k, v)| (*k, (*v).to_owned())),
    );
    if crate::reply::etag_matches(if_none_match, &asset.etag) {
        return (StatusCode::NOT_MODIFIED, headers, Bytes::new());
    }
    let body = if gzip {
        headers.push(("content-encoding", "gzip".to_owned()));
        asset.gzip.clone()
    } else {
        asset.plain.clone()
    };
    headers.push(("content-length", body.len().to_string()));
    (StatusCode::OK, headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_every_asset_by_its_fingerprint() {
        let web = Web::new();
        let page = std::str::from_utf8(&web.get("/").unwrap().plain).unwrap();
        assert!(!page.contains("{{"), "a placeholder is left: {page}");
        let assets: Vec<&str> = web.paths().into_iter().filter(|p| *p != "/").collect();
        assert_eq!(assets.len(), FILES.len());
        for path in assets {
            assert!(page.contains(path), "{path} is not on the page");
            let a = web.get(path).unwrap();
            let hash = path.rsplit('.').nth(1).unwrap();
            assert_eq!(a.etag, format!("\"{hash}\""));
            let mut plain = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&a.gzip[..]), &mut plain)
                .unwrap();
            assert_eq!(plain, a.plain, "{path}: gzip round trip");
        }
    }

    #[test]
    fn no_inline_script_or_style_on_the_page() {
        let web = Web::new();
        let page = std::str::from_utf8(&web.get("/").unwrap().plain).unwrap();
        for bad in ["<script>", "style=", "onclick=", "onload=", "<style"] {
            assert!(!page.contains(bad), "{bad} on the page");
        }
        for file in ["app.js", "console.js"] {
            let (_, _, body) = FILES.iter().find(|(n, _, _)| *n == file).unwrap();
            let text = std::str::from_utf8(body).unwrap();
            for bad in ["innerHTML", "eval(", "new Function", "localStorage"] {
                assert!(!text.contains(bad), "{bad} in {file}");
            }
        }
    }

    #[test]
    fn gzip_is_served_only_to_clients_that_take_it() {
        assert!(accepts_gzip(Some("gzip, deflate, br")));
        assert!(accepts_gzip(Some("br;q=1.0, gzip;q=0.8")));
        assert!(accepts_gzip(Some("*")));
        assert!(!accepts_gzip(Some("gzip;q=0")));
        assert!(!accepts_gzip(Some("br")));
        assert!(!accepts_gzip(None));
        let web = Web::new();
        let page = web.get("/").unwrap();
        let (status, headers, body) = answer(page, false, Some(&page.etag));
        assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
        assert!(
            headers
                .iter()
                .any(|(k, v)| *k == "cache-control" && v == "no-cache")
        );
    }
}
