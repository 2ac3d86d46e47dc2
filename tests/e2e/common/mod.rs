//! What the end-to-end tests share: starting ShopVerse (in this process, or the real binary
//! where a test needs a process: signals, crashes, output) and talking to it.

#![allow(dead_code)] // each test binary uses a different part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

pub mod gateway;
pub mod saga;

pub const BIN: &str = env!("CARGO_BIN_EXE_shopverse");

/// A running appliance: in this process, or a `shopverse` child process. Stopped (or killed)
/// when dropped.
pub struct Appliance {
    child: Option<Child>,
    inside: Option<InProcess>,
    pub users: SocketAddr,
    pub products: SocketAddr,
    pub admin: SocketAddr,
    /// Every component's address, by name (`gateway`, `orders`, `admin`, ...).
    pub addrs: std::collections::HashMap<String, SocketAddr>,
    /// What a child process printed up to its ready line.
    pub stdout: Vec<String>,
}

/// An appliance on its own runtime thread in this process.
struct InProcess {
    stop: shopverse_kit::CancellationToken,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl Appliance {
    /// Every service and the gateway in this process, on any ports, with the built-in
    /// configuration; `extra` may hold `--demo`.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Appliance {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// [`Appliance::start`] with `SHOPVERSE_*` configuration overrides.
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Appliance {
        let demo = match extra {
            [] => false,
            ["--demo"] => true,
            other => panic!("in-process appliance: unsupported arguments {other:?}"),
        };
        let overrides: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| {
                assert!(k.starts_with("SHOPVERSE_"), "not a configuration key: {k}");
                ((*k).to_owned(), (*v).to_owned())
            })
            .collect();
        // Pingora's server (the gateway) starts once per process; a second one, started after
        // the first stopped, never listens. Tests run one process each (cargo nextest).
        static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        assert!(
            !STARTED.swap(true, std::sync::atomic::Ordering::SeqCst),
            "one in-process appliance per test process: start any other with Appliance::binary"
        );
        let mut cfg: shopverse::AppConfig =
            shopverse_kit::config::from_str("", "built-in defaults", overrides)
                .unwrap_or_else(|e| panic!("configuration: {e}"));
        cfg.data.dir = data_dir.to_owned();
        // Warnings and errors on stderr, as a child process with RUST_LOG=warn would print them.
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned());
        shopverse_kit::telemetry::init(&cfg.telemetry, Some(&filter));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(run_in_process(cfg, demo, tx))
        });
        let started = rx.recv_timeout(Duration::from_secs(120));
        let (line, stop) = match started {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("the appliance did not start: {e}"),
            Err(_) => panic!(
                "the appliance did not start within 120 s: {:?}",
                thread.join()
            ),
        };
        let mut app = Self::empty();
        app.inside = Some(InProcess { stop, thread });
        app.read_ready_line(&line);
        app
    }

    /// The real binary: `shopverse up --data-dir DIR --any-ports-on 127.0.0.1 EXTRA` with `env`.
    pub fn binary(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Appliance {
        let mut args: Vec<std::ffi::OsString> = vec!["up".into(), "--data-dir".into()];
        args.push(data_dir.into());
        args.extend(["--any-ports-on", "127.0.0.1"].map(Into::into));
        args.extend(extra.iter().map(Into::into));
        Self::spawn(&args, env)
    }

    fn empty() -> Appliance {
        let none: SocketAddr = "0.0.0.0:0".parse().expect("addr");
        Appliance {
            child: None,
            inside: None,
            users: none,
            products: none,
            admin: none,
            addrs: Default::default(),
            stdout: Vec::new(),
        }
    }

    fn read_ready_line(&mut self, rest: &str) {
        for part in rest.split_whitespace() {
            let (name, addr) = part.split_once('=').expect("name=addr");
            let addr: SocketAddr = addr.parse().expect("socket address");
            self.addrs.insert(name.to_owned(), addr);
            match name {
                "users" => self.users = addr,
                "products" => self.products = addr,
                "admin" => self.admin = addr,
                _ => {}
            }
        }
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
        let mut app = Self::empty();
        app.child = Some(child);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no ready line; output so far: {lines:#?}"));
            lines.push(line.clone());
            if let Some(rest) = line.strip_prefix("ready: ") {
                app.read_ready_line(rest);
                app.stdout = lines;
                return app;
            }
        }
    }

    /// The child process's id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("a child process")
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(mut self) {
        let mut c = self.child.take().expect("a child process");
        c.kill().expect("SIGKILL");
        c.wait().expect("reaped");
    }

    /// Waits for the process to end by itself (at a crash point, say); its exit status.
    pub fn wait_exit(mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("a child process");
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

    /// Stops it as an operator would (SIGTERM to a child): it must end cleanly within 20 s.
    pub fn stop(mut self) {
        if let Some(inside) = self.inside.take() {
            inside.stop.cancel();
            let t0 = Instant::now();
            let ended = inside.thread.join().expect("the appliance thread panicked");
            assert!(ended.is_ok(), "stopped with an error: {ended:?}");
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "took {:?} to stop",
                t0.elapsed()
            );
            return;
        }
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

type Started = Result<(String, shopverse_kit::CancellationToken), String>;

/// Starts the appliance (seeding and placing the demo orders first if `demo`, as `up --demo`
/// does), reports its ready line through `started`, and runs it until stopped.
async fn run_in_process(
    cfg: shopverse::AppConfig,
    demo: bool,
    started: std::sync::mpsc::Sender<Started>,
) -> Result<(), String> {
    let start = async {
        if demo {
            std::fs::create_dir_all(&cfg.data.dir).map_err(|e| e.to_string())?;
            if shopverse::demo::catalog_is_empty(&cfg)
                .await
                .map_err(|e| e.to_string())?
            {
                shopverse::demo::seed(&cfg)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        let running = shopverse::Appliance::new(cfg)
            .any_ports([127, 0, 0, 1].into())
            .start()
            .await
            .map_err(|e| e.to_string())?;
        if demo {
            let at = |n| running.service(n).expect("every service runs");
            shopverse::demo::place_orders(at("users"), at("products"), at("orders"))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(running)
    };
    match start.await {
        Ok(running) => {
            let _ = started.send(Ok((running.ready_line(), running.shutdown_token())));
            running.wait().await.map_err(|e| e.to_string())
        }
        Err(e) => {
            let _ = started.send(Err(e.clone()));
            Err(e)
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(inside) = self.inside.take() {
            inside.stop.cancel();
            let _ = inside.thread.join();
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

/// `Authorization: Bearer <token>`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The password the tests' customers sign up with.
pub const PASSWORD: &str = "a long password";

/// Every service of the appliance, by name (each has `<name>.db` in an appliance's data
/// directory and `shopverse_<name>` in the distributed mode's PostgreSQL).
pub const SERVICE_NAMES: [&str; 6] = [
    "users",
    "products",
    "orders",
    "payments",
    "notifications",
    "delivery",
];

/// Runs `cmd` to its end; fails the test with its standard error unless it succeeded.
pub fn succeeds(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Registers `email` through the gateway at `gw` and signs it in: its user id and its
/// `Authorization` value.
pub fn customer(gw: SocketAddr, email: &str) -> (String, String) {
    let id = register(gw, email, PASSWORD);
    (id, bearer(&login(gw, email, PASSWORD)))
}

/// The Python with the test tools (aiosmtpd and the validators) that scripts/test sets up.
pub fn python() -> String {
    std::env::var("SHOPVERSE_TEST_PYTHON")
        .expect("SHOPVERSE_TEST_PYTHON: scripts/test sets it up (see README)")
}

/// The appliance with demo data, `env` and the administrator `root@example.com`, and the
/// administrator's token.
pub fn with_admin(dir: &Path, env: &[(&str, &str)]) -> (Appliance, String) {
    let (ok, _, err) = cli(
        dir,
        &["admin", "create", "--email", "root@example.com"],
        &[("SHOPVERSE_ADMIN_PASSWORD", "root password 123")],
    );
    assert!(ok, "{err}");
    let app = Appliance::start_with_env(dir, &["--demo"], env);
    let admin = bearer(&login(
        app.addrs["gateway"],
        "root@example.com",
        "root password 123",
    ));
    (app, admin)
}

/// Puts one unit of the demo catalog's `nth` product in the cart of the customer whose
/// `authorization` leads `headers`, and checks out with `key` paying with `card`, sending
/// `headers`; the answer.
pub fn buy_with(
    gw: SocketAddr,
    headers: &[(&str, &str)],
    nth: usize,
    key: &str,
    card: &str,
) -> HttpResponse {
    let products = http(gw, "GET", "/v1/products?pageSize=5", &[], b"").json();
    let p = products["products"][nth]["id"].as_str().unwrap();
    let add = format!(r#"{{"productId":"{p}","quantity":1}}"#);
    let added = http(gw, "POST", "/v1/cart/items", &headers[..1], add.as_bytes());
    assert_eq!(added.status, 200, "{}", added.body);
    let checkout = format!(
        r#"{{"idempotencyKey":"{key}","paymentMethodToken":"{card}","shippingAddress":{{"recipient":"O","line1":"1 Main St","city":"Berlin","postalCode":"10115","country":"DE"}}}}"#
    );
    http(gw, "POST", "/v1/checkout", headers, checkout.as_bytes())
}
