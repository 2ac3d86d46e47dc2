//! Idle upstream connections, per thread, for both HTTP/1 pass-through paths.
//!
//! Pingora runs each thread's connections on that thread's own runtime, so a pool per thread
//! needs no lock: an idle connection is tested once when it is taken (a read that would block
//! means it is still open), and a sweeper closes the ones the upstream closed meanwhile.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::FutureExt;
use pingora::protocols::Stream;
use tokio::io::AsyncReadExt;

/// Idle connections kept per upstream address and thread.
const MAX_IDLE: usize = 128;
/// An idle connection older than this is closed rather than reused (upstreams commonly close
/// idle keep-alive connections after 60 s or more; staying under that avoids most races).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

thread_local! {
    /// Idle upstream connections of this thread, newest last. Pingora runs each thread's
    /// connections on that thread's own runtime, so a pool per thread needs no lock.
    static IDLE: RefCell<IdlePool> = RefCell::new(IdlePool::default());
    /// Whether this thread's pool has a sweeper running.
    static SWEEPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How often a thread's idle connections are looked over, so that one the upstream closed (or
/// idle for too long) is closed here too rather than kept until the next request.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Keyed by configured upstream addresses, not by anything a client sends: a fast hash
/// (SipHash was a tenth of the pool's cost per request).
type IdlePool = HashMap<SocketAddr, Vec<(Stream, Instant)>, rustc_hash::FxBuildHasher>;

/// Why a request could not be proxied; nothing was sent downstream yet for the first two.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// The upstream could not be reached or failed before its response header.
    #[error("upstream {addr}: {source}")]
    Unavailable {
        addr: SocketAddr,
        source: Box<pingora::Error>,
    },
    /// The upstream did not answer in time.
    #[error("upstream {addr} did not answer in time")]
    Timeout { addr: SocketAddr },
    /// The client's request body did not arrive in time.
    #[error("the request body did not arrive in time")]
    ClientTimeout,
    /// The client's request body is larger than the body limit.
    #[error("the request body is larger than {max} bytes")]
    TooLarge { max: usize },
    /// The client's request body could not be read.
    #[error("request body: {0}")]
    Client(Box<pingora::Error>),
    /// Failed after the response header went downstream: the connection can only be closed.
    #[error("after the response started: {0}")]
    Midway(Box<pingora::Error>),
}

/// Time limits of one pass-through request.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    /// Connecting, and each read and write to the upstream.
    pub upstream: Duration,
    /// The whole of the client's request body.
    pub client_body: Duration,
    /// The largest request body accepted.
    pub max_body: usize,
}

/// A pooled connection to `addr` that still looks open (`true`), or a new one.
pub(crate) async fn pooled_or_dial(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(Stream, bool), Failure> {
    while let Some(mut stream) = take(addr) {
        if idle_and_open(&mut stream) {
            return Ok((stream, true));
        }
    }
    Ok((dial(addr, timeout).await?, false))
}

/// A new connection to `addr`.
pub(crate) async fn dial(addr: SocketAddr, timeout: Duration) -> Result<Stream, Failure> {
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| Failure::Timeout { addr })?
        .map_err(|e| Failure::Unavailable {
            addr,
            source: pingora::Error::because(pingora::ErrorType::ConnectError, "connect", e),
        })?;
    // Small requests and answers: Nagle would hold each for the peer's delayed ACK.
    let _ = tcp.set_nodelay(true);
    Ok(Box::new(pingora::protocols::l4::stream::Stream::from(tcp)))
}

/// The newest idle connection to `addr` that has not been idle too long.
fn take(addr: SocketAddr) -> Option<Stream> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some((stream, since)) = list.pop() {
            if since.elapsed() < IDLE_TIMEOUT {
                return Some(stream);
            }
            // The rest are older still.
            list.clear();
        }
        None
    })
}

/// Keeps an upstream connection for the next request to `addr`.
pub(crate) fn release(addr: SocketAddr, stream: Stream) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() >= MAX_IDLE {
            // Drop the oldest: it is the likeliest to have been closed by the upstream.
            list.remove(0);
        }
        list.push((stream, Instant::now()));
    });
    if !SWEEPING.replace(true) {
        // Spawned on this thread's runtime (each Pingora thread runs its own), so it sweeps
        // this thread's pool.
        tokio::spawn(sweep());
    }
}

/// Closes idle connections the upstream closed, and those idle too long; ends when the pool
/// is empty (the next release starts another).
async fn sweep() {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let any_left = IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            for list in idle.values_mut() {
                list.retain_mut(|(stream, since)| {
                    since.elapsed() < IDLE_TIMEOUT && idle_and_open(stream)
                });
            }
            idle.retain(|_, list| !list.is_empty());
            !idle.is_empty()
        });
        if !any_left {
            SWEEPING.set(false);
            return;
        }
    }
}

/// An idle connection has nothing to read: data or end of stream means it cannot be reused.
/// This reads only if the runtime saw the socket become readable, so usually no system call.
fn idle_and_open(stream: &mut Stream) -> bool {
    let mut buf = [0u8; 1];
    tokio::task::unconstrained(stream.read(&mut buf))
        .now_or_never()
        .is_none()
}
