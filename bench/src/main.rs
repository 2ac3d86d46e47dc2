//! `shopverse-load`: the benchmarks' load generator.
//!
//! Each of `--connections` workers owns one connection (HTTP/1.1 keep-alive, or one HTTP/2
//! channel for gRPC) and makes one call at a time.
//!
//! - **Open loop** (`--rate R`): request *i* is due at `start + i / R`, whatever happened to
//!   the ones before it. A pacer thread releases one permit per request as it falls due (it
//!   checks every 100 µs; tokio's 1 ms timer would send in bursts), and a free worker takes it.
//!   Latency is counted from when the request was *due*, not from when it was sent. So a
//!   stalled server is charged for every request it kept waiting, and no measurement is lost to
//!   coordinated omission (the wrk2 model). The pacer's own lateness (~0.1 ms) is charged
//!   too, alike for every target.
//! - **Closed loop** (`--rate 0`): every worker sends again as soon as its answer is in; this
//!   measures peak throughput, and its latencies are those of a saturated server.
//!
//! The first `--warmup` seconds are sent but not recorded. One JSON object goes to stdout.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use shopverse_proto::products::v1::GetProductRequest;
use shopverse_proto::products::v1::products_service_client::ProductsServiceClient;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "shopverse-load",
    about = "Open- and closed-loop load for the ShopVerse benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Load {
    /// Requests per second to offer (open loop); 0: closed loop, as fast as answers come.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds sent first and not recorded.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Connections, each with one call in flight at a time.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Calls in flight at a time on each connection (gRPC only: HTTP/2 streams).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// `key=value` copied into the report (which scenario and target this was); repeatable.
    #[arg(long = "tag")]
    tags: Vec<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// GET a URL over HTTP/1.1 keep-alive connections.
    Http {
        #[command(flatten)]
        load: Load,
        /// `http://host:port/path` (plain HTTP on loopback).
        url: String,
        /// Extra request header, `name: value`; repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
    /// Call `ProductsService/GetProduct` over gRPC (HTTP/2, cleartext).
    Grpc {
        #[command(flatten)]
        load: Load,
        /// `http://host:port` of the products service (or of the gateway, which takes gRPC).
        #[arg(long)]
        addr: String,
        /// The product id to get.
        #[arg(long)]
        product: String,
        /// Extra request metadata, `name: value`; repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
    },
}

/// What one call came to.
enum Outcome {
    Ok,
    /// An answer, but not a success (HTTP status outside 2xx, or a gRPC error status).
    Failed,
    /// No answer: the connection broke or could not be made.
    Broken,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // One thread: the load generator is pinned to its own core by bench/run.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        match cli.cmd {
            Cmd::Http { load, url, headers } => {
                let target = HttpTarget::parse(&url, &headers)?;
                drive(&load, || HttpWorker::connect(target.clone())).await
            }
            Cmd::Grpc {
                load,
                addr,
                product,
                headers,
            } => {
                let headers = parse_headers(&headers)?;
                drive(&load, || {
                    GrpcWorker::connect(addr.clone(), product.clone(), headers.clone())
                })
                .await
            }
        }
    })?;
    println!("{report}");
    Ok(())
}

fn parse_headers(raw: &[String]) -> Result<Vec<(http::HeaderName, http::HeaderValue)>> {
    raw.iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .with_context(|| format!("header `{h}`: expected `name: value`"))?;
            Ok((
                http::HeaderName::try_from(name.trim())
                    .with_context(|| format!("header name `{name}`"))?,
                http::HeaderValue::try_from(value.trim())
                    .with_context(|| format!("header value of `{name}`"))?,
            ))
        })
        .collect()
}

#[derive(Clone)]
struct HttpTarget {
    addr: SocketAddr,
    authority: String,
    path: String,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl HttpTarget {
    fn parse(url: &str, headers: &[String]) -> Result<HttpTarget> {
        let uri: http::Uri = url.parse().with_context(|| format!("URL `{url}`"))?;
        if uri.scheme_str() != Some("http") {
            bail!("URL `{url}`: only http:// is supported");
        }
        let authority = uri
            .authority()
            .with_context(|| format!("URL `{url}` has no host"))?
            .to_string();
        let addr = authority
            .parse()
            .with_context(|| format!("URL `{url}`: the host must be an IP address and port"))?;
        Ok(HttpTarget {
            addr,
            authority,
            path: uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into()),
            headers: parse_headers(headers)?,
        })
    }
}

struct HttpWorker {
    target: HttpTarget,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl HttpWorker {
    async fn connect(target: HttpTarget) -> Result<HttpWorker> {
        let mut w = HttpWorker {
            target,
            sender: None,
        };
        w.sender = Some(w.open().await?);
        Ok(w)
    }

    async fn open(&self) -> Result<SendRequest<Empty<Bytes>>> {
        let stream = tokio::net::TcpStream::connect(self.target.addr)
            .await
            .with_context(|| format!("connecting to {}", self.target.addr))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn call(&mut self) -> Outcome {
        let sender = match &mut self.sender {
            Some(s) => s,
            None => match self.open().await {
                Ok(s) => self.sender.insert(s),
                Err(_) => return Outcome::Broken,
            },
        };
        let mut req = http::Request::builder()
            .uri(self.target.path.as_str())
            .header(http::header::HOST, self.target.authority.as_str());
        for (n, v) in &self.target.headers {
            req = req.header(n, v);
        }
        let Ok(req) = req.body(Empty::new()) else {
            return Outcome::Broken;
        };
        let res = match sender.send_request(req).await {
            Ok(r) => r,
            Err(_) => {
                self.sender = None;
                return Outcome::Broken;
            }
        };
        let ok = res.status().is_success();
        if res.into_body().collect().await.is_err() {
            self.sender = None;
            return Outcome::Broken;
        }
        if ok { Outcome::Ok } else { Outcome::Failed }
    }
}

#[derive(Clone)]
struct GrpcWorker {
    client: ProductsServiceClient<Channel>,
    product: String,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl GrpcWorker {
    async fn connect(
        addr: String,
        product: String,
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    ) -> Result<GrpcWorker> {
        let channel = Channel::from_shared(addr.clone())
            .with_context(|| format!("address `{addr}`"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        Ok(GrpcWorker {
            client: ProductsServiceClient::new(channel),
            product,
            headers,
        })
    }

    async fn call(&mut self) -> Outcome {
        let mut req = tonic::Request::new(GetProductRequest {
            id: self.product.clone(),
        });
        for (n, v) in &self.headers {
            if let (Ok(n), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(n.as_str().as_bytes()),
                tonic::metadata::MetadataValue::try_from(v.as_bytes()),
            ) {
                req.metadata_mut().insert(n, v);
            }
        }
        match self.client.get_product(req).await {
            Ok(_) => Outcome::Ok,
            Err(s) if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown => {
                Outcome::Broken
            }
            Err(_) => Outcome::Failed,
        }
    }
}

/// A worker of either kind.
enum Worker {
    Http(HttpWorker),
    Grpc(GrpcWorker),
}

impl From<HttpWorker> for Worker {
    fn from(w: HttpWorker) -> Worker {
        Worker::Http(w)
    }
}

impl From<GrpcWorker> for Worker {
    fn from(w: GrpcWorker) -> Worker {
        Worker::Grpc(w)
    }
}

impl Worker {
    /// Another worker on the same connection, where the protocol multiplexes calls.
    fn share(&self) -> Option<Worker> {
        match self {
            Worker::Http(_) => None,
            Worker::Grpc(w) => Some(Worker::Grpc(w.clone())),
        }
    }

    async fn call(&mut self) -> Outcome {
        match self {
            Worker::Http(w) => w.call().await,
            Worker::Grpc(w) => w.call().await,
        }
    }
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    ok: u64,
    failed: u64,
    broken: u64,
}

/// Runs the load and returns the report as JSON.
async fn drive<W, F, Fut>(load: &Load, connect: F) -> Result<serde_json::Value>
where
    W: Into<Worker>,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<W>>,
{
    if load.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if load.seconds.is_nan() || load.seconds <= 0.0 || load.warmup.is_nan() || load.warmup < 0.0 {
        bail!("--seconds must be positive and --warmup not negative");
    }
    if load.streams == 0 {
        bail!("--streams must be at least 1");
    }
    let mut workers: Vec<Worker> = Vec::with_capacity(load.connections * load.streams);
    for _ in 0..load.connections {
        let first: Worker = connect().await?.into();
        for _ in 1..load.streams {
            workers.push(
                first
                    .share()
                    .context("--streams above 1 needs a multiplexed protocol (grpc)")?,
            );
        }
        workers.push(first);
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(load.warmup);
    let end = measure_from + Duration::from_secs_f64(load.seconds);
    // Requests due but not sent by then are reported as unsent, not waited for.
    let give_up = end + Duration::from_secs(2);
    let next = Rc::new(Cell::new(0u64));
    let tally = Rc::new(RefCell::new(Tally::default()));
    let rate = load.rate;
    let total =
        (Duration::from_secs_f64(load.warmup + load.seconds).as_secs_f64() * rate as f64) as u64;
    // Open loop: a pacer thread hands out one permit per request as it falls due, checking
    // every 100 µs (tokio's timer has 1 ms ticks, which would send in bursts of rate/1000).
    let permits = Arc::new(tokio::sync::Semaphore::new(0));
    if rate > 0 {
        let permits = permits.clone();
        std::thread::spawn(move || {
            let mut released = 0u64;
            while released < total {
                let now = Instant::now();
                if now >= give_up {
                    break;
                }
                let due = (((now - start).as_secs_f64() * rate as f64) as u64 + 1).min(total);
                if due > released {
                    permits.add_permits((due - released) as usize);
                    released = due;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            permits.close();
        });
    }
    let runs = workers.into_iter().map(|mut worker: Worker| {
        let next = next.clone();
        let tally = tally.clone();
        let permits = permits.clone();
        async move {
            loop {
                let (from, recorded) = if rate > 0 {
                    let Ok(permit) = permits.acquire().await else {
                        break;
                    };
                    permit.forget();
                    let i = next.get();
                    next.set(i + 1);
                    if i >= total || Instant::now() >= give_up {
                        break;
                    }
                    // Counted from when it fell due, however long it waited for a free worker.
                    let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                    (due, due >= measure_from)
                } else {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    (now, now >= measure_from)
                };
                let outcome = worker.call().await;
                if !recorded {
                    continue;
                }
                let mut t = tally.borrow_mut();
                match outcome {
                    Outcome::Ok => {
                        t.ok += 1;
                        t.latencies_us.push(from.elapsed().as_micros() as u64);
                    }
                    Outcome::Failed => {
                        t.failed += 1;
                        t.latencies_us.push(from.elapsed().as_micros() as u64);
                    }
                    Outcome::Broken => t.broken += 1,
                }
            }
        }
    });
    futures::future::join_all(runs).await;
    let elapsed = end
        .min(Instant::now())
        .duration_since(measure_from)
        .as_secs_f64();
    let mut t = tally.take();
    let scheduled = if rate > 0 {
        (load.seconds * rate as f64).round() as u64
    } else {
        0
    };
    let done = t.ok + t.failed + t.broken;
    t.latencies_us.sort_unstable();
    let pct = |q: f64| -> u64 {
        if t.latencies_us.is_empty() {
            return 0;
        }
        let i = ((q * t.latencies_us.len() as f64).ceil() as usize).clamp(1, t.latencies_us.len());
        t.latencies_us[i - 1]
    };
    let mean = if t.latencies_us.is_empty() {
        0.0
    } else {
        t.latencies_us.iter().sum::<u64>() as f64 / t.latencies_us.len() as f64
    };
    let mut report = serde_json::json!({
        "mode": if rate > 0 { "open" } else { "closed" },
        "offered_rps": rate,
        "connections": load.connections,
        "streams": load.streams,
        "seconds": load.seconds,
        "requests": done,
        "ok": t.ok,
        "failed": t.failed,
        "broken": t.broken,
        "unsent": scheduled.saturating_sub(done),
        "achieved_rps": (t.ok + t.failed) as f64 / elapsed.max(1e-9),
        "latency_us": {
            "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p999": pct(0.999),
            "max": t.latencies_us.last().copied().unwrap_or(0), "mean": mean.round() as u64,
        },
    });
    for tag in &load.tags {
        let (k, v) = tag
            .split_once('=')
            .with_context(|| format!("--tag `{tag}`: expected key=value"))?;
        report[k] = serde_json::Value::String(v.to_owned());
    }
    Ok(report)
}
