//! Helpers of the gateway tests: tokens, a gateway of its own in front of chosen upstreams,
//! small HTTP upstreams, metrics, raw responses.

#![allow(dead_code)]

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::net::SocketAddr;

use super::*;

/// Signs `claims` with the users service's active key, read from its keys folder.
pub fn sign_with_real_key(data: &std::path::Path, claims: &serde_json::Value) -> String {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("keys/keys.json")).unwrap()).unwrap();
    let kid = manifest["keys"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|k| k["retired_at_ms"].is_null())
        .unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let der = std::fs::read(data.join(format!("keys/{kid}.key"))).unwrap();
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(kid);
    jsonwebtoken::encode(&h, claims, &EncodingKey::from_ed_der(&der)).unwrap()
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A `shopverse gateway` process alone, in front of services that are not running.
pub struct LoneGateway {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl LoneGateway {
    pub fn start(dir: &std::path::Path, name: &str, env: &[(&str, &str)]) -> LoneGateway {
        Self::start_with(dir, name, env, "")
    }

    pub fn start_with_args(
        dir: &std::path::Path,
        name: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> LoneGateway {
        Self::start_full(dir, name, env, "", args, None)
    }

    /// `extra` is appended to the configuration file.
    pub fn start_with(
        dir: &std::path::Path,
        name: &str,
        env: &[(&str, &str)],
        extra: &str,
    ) -> LoneGateway {
        Self::start_full(dir, name, env, extra, &[], None)
    }

    /// `users`: where the users service answers (none: nowhere).
    pub fn start_full(
        dir: &std::path::Path,
        name: &str,
        env: &[(&str, &str)],
        extra: &str,
        args: &[&str],
        users: Option<SocketAddr>,
    ) -> LoneGateway {
        // Port 1: nothing listens there, and no test's port-0 server can be given it (a port
        // bound and released here could be, and then "down" answered).
        let dead: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let users = users.unwrap_or(dead);
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!("[gateway]\nlisten = \"127.0.0.1:0\"\n[gateway.upstreams]\nusers = [\"http://{users}\"]\nproducts = [\"http://{dead}\"]\n{extra}"),
        )
        .unwrap();
        #[allow(clippy::zombie_processes)] // `stop` and `Drop` reap it
        let mut child = std::process::Command::new(BIN)
            .args(["gateway", "--config"])
            .arg(&cfg)
            .args(["--admin-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let (addr, admin) = loop {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "no ready line");
            if let Some(rest) = line.trim().strip_prefix("ready: gateway=") {
                let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
                let admin = rest.rsplit("admin=").next().unwrap().parse().unwrap();
                break (addr, admin);
            }
        };
        LoneGateway { child, addr, admin }
    }

    pub fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

impl Drop for LoneGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP upstream that answers every request with `reply` and records what it was sent.
pub fn recording_upstream(
    reply: &'static [u8],
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = upstream.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in upstream.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = vec![0u8; 16 << 10];
            let n = s.read(&mut buf).unwrap_or(0);
            seen2
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = s.write_all(reply);
        }
    });
    (addr, seen)
}

pub fn metric(admin: SocketAddr, needle: &str) -> u64 {
    let text = http(admin, "GET", "/metrics", &[], b"").body;
    text.lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// A keep-alive HTTP/1.1 upstream: answers `GET /ka/chunked` with a chunked body, echoes the
/// body of `POST /ka/echo`, and closes its side after `GET /ka/bye` (as an upstream whose idle
/// timeout ran out would). Counts the connections it accepted.
pub fn keepalive_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::Ordering;
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = upstream.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in upstream.incoming() {
            let Ok(s) = stream else { return };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                loop {
                    let mut head = Vec::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push(line.to_lowercase());
                    }
                    let len = head
                        .iter()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let reply = if head[0].starts_with("head ") {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec()
                    } else if head[0].starts_with("get /ka/close") {
                        // An HTTP/1.0-style answer: the body ends when the connection does.
                        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nstream");
                        let _ = w.write_all(b"ed");
                        return;
                    } else if head[0].starts_with("get /ka/many") {
                        // More response headers than the front's first parse has room for.
                        let mut v = b"HTTP/1.1 200 OK\r\n".to_vec();
                        for i in 0..100 {
                            v.extend_from_slice(format!("x-h{i}: {i}\r\n").as_bytes());
                        }
                        v.extend_from_slice(b"content-length: 4\r\n\r\nmany");
                        v
                    } else if head[0].starts_with("get /ka/chunked") {
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nkeep-alive: timeout=60\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n".to_vec()
                    } else if head[0].starts_with("post /ka/echo") {
                        let mut v =
                            format!("HTTP/1.1 201 Created\r\ncontent-length: {len}\r\n\r\n")
                                .into_bytes();
                        v.extend_from_slice(&body);
                        v
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye".to_vec()
                    };
                    if w.write_all(&reply).is_err() {
                        return;
                    }
                    if head[0].starts_with("get /ka/bye") {
                        return; // closes without saying so
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A chunked HTTP/1.1 body, decoded.
pub fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

/// One response read off a kept-alive connection: status, lower-cased headers, body (chunked
/// bodies decoded).
pub fn read_response(
    r: &mut std::io::BufReader<std::net::TcpStream>,
    head_request: bool,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use std::io::{BufRead, Read};
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.push((k.trim().to_lowercase(), v.trim().to_owned()));
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if head_request {
    } else if get("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = get("content-length") {
        body.resize(n.parse().unwrap(), 0);
        r.read_exact(&mut body).unwrap();
    }
    (status, headers, body)
}
