//! What the black-box tests share: starting the real `shopverse` binary and talking to it.

#![allow(dead_code)] // each test binary uses a different part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

pub mod saga;

pub const BIN: &str = env!("CARGO_BIN_EXE_shopverse");

/// A running `shopverse up`; killed if the test fails before stopping it.
pub struct Appliance {
    child: Option<Child>,
    pub users: SocketAddr,
    pub products: SocketAddr,
    pub admin: SocketAddr,
    /// Every `name=address` of the ready line.
    pub addrs: std::collections::HashMap<String, SocketAddr>,
    pub stdout: Vec<String>,
}

impl Appliance {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Appliance {
        Self::start_with_env(data_dir, extra, &[])
    }

    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Appliance {
        let mut args: Vec<std::ffi::OsString> = vec!["up".into(), "--data-dir".into()];
        args.push(data_dir.into());
        args.extend(["--any-ports-on", "127.0.0.1"].map(Into::into));
        args.extend(extra.iter().map(Into::into));
        Self::spawn(&args, env)
    }

    /// Runs `shopverse ARGS` and waits for its `ready:` line.
    pub fn spawn<A: AsRef<std::ffi::OsStr>>(args: &[A], env: &[(&str, &str)]) -> Appliance {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start shopverse");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut lines = Vec::new();
        let mut app = Appliance {
            child: Some(child),
            users: "0.0.0.0:0".parse().expect("addr"),
            products: "0.0.0.0:0".parse().expect("addr"),
            admin: "0.0.0.0:0".parse().expect("addr"),
            addrs: Default::default(),
            stdout: Vec::new(),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no ready line; output so far: {lines:#?}"));
            lines.push(line.clone());
            if let Some(rest) = line.strip_prefix("ready: ") {
                for part in rest.split_whitespace() {
                    let (name, addr) = part.split_once('=').expect("name=addr");
                    let addr: SocketAddr = addr.parse().expect("socket address");
                    app.addrs.insert(name.to_owned(), addr);
                    match name {
                        "users" => app.users = addr,
                        "products" => app.products = addr,
                        "admin" => app.admin = addr,
                        _ => {}
                    }
                }
                app.stdout = lines;
                return app;
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("reaped");
        }
    }

    /// Waits for the process to end by itself (at a crash point, say); its exit status.
    pub fn wait_exit(mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("still running after {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the process must exit 0 within the grace period.
    pub fn stop(mut self) {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(status.success(), "exit status {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub fn cli(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run shopverse");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A response as a plain HTTP/1.1 client sees it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write");
    // A server may answer (413, say) and close before reading the whole body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Signs in through the gateway at `gw`; the access token.
pub fn login(gw: SocketAddr, email: &str, password: &str) -> String {
    let r = http(
        gw,
        "POST",
        "/v1/auth/login",
        &[],
        format!(r#"{{"email":"{email}","password":"{password}"}}"#).as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["accessToken"]
        .as_str()
        .expect("an access token")
        .to_owned()
}

/// Registers `email` through the gateway at `gw`; the new user's id.
pub fn register(gw: SocketAddr, email: &str, password: &str) -> String {
    let body = format!(r#"{{"email":"{email}","password":"{password}","displayName":"{email}"}}"#);
    let r = http(gw, "POST", "/v1/auth/register", &[], body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["user"]["id"]
        .as_str()
        .expect("the new user's id")
        .to_owned()
}

/// Polls `f` every 50 ms until it holds, failing the test after `within`.
pub fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
