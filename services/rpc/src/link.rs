//! How a client reaches a gRPC service: over the network (a tonic [`Channel`], converted with
//! `Link::from`), or, when this process serves that service itself, by calling its routes
//! directly ([`LocalServices`]): the same request and response messages, codecs, metadata,
//! health and status codes, without a socket, HTTP/2 framing or a connection task on either
//! side.
//!
//! The appliance runs every service in one process and used to call them over loopback TCP:
//! the gateway for every transcoded request, orders for every product it prices or reserves.
//! Each such call cost two HTTP/2 codecs, four socket syscalls and wake-ups of the connection
//! tasks on both ends. A local call is a task on the serving runtime, which keeps the serving
//! side's concurrency (a slow handler does not hold up its caller's task) and its cancellation
//! (a caller that gives up aborts the handler, as a reset stream does).
//!
//! Which addresses are local is declared by the process before it starts its services: an
//! address not declared is always called over the network, so a distributed deployment (one
//! service per process) is unchanged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::TryFutureExt;
use futures::future::{BoxFuture, Either, MapErr};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::transport::channel::ResponseFuture;

use crate::pool::Pool;

/// The error of a call through a [`Link`]: a transport error or a [`Status`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A client transport for tonic's generated clients (`FooClient::new(link)`) and
/// `tonic::client::Grpc`.
#[derive(Clone)]
pub struct Link(Inner);

#[derive(Clone)]
enum Inner {
    Remote(Channel),
    Local { slot: Arc<Slot>, timeout: Duration },
    Pooled(Arc<Pool>),
    Metered(Box<crate::metrics::Metered<Link>>),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Remote(_) => f.write_str("Link::Remote"),
            Inner::Local { slot, .. } => write!(f, "Link::Local({})", slot.addr),
            Inner::Pooled(pool) => write!(f, "Link::Pooled({pool:?})"),
            Inner::Metered(m) => write!(f, "Link::Metered({:?})", m.inner()),
        }
    }
}

impl Link {
    /// Calls spread over a pool's healthy members; a member whose call fails before any answer
    /// is ejected until it passes a health check.
    pub fn pooled(pool: Arc<Pool>) -> Link {
        Link(Inner::Pooled(pool))
    }

    /// The same link, its calls counted and timed by `metrics`' client-side families.
    pub fn metered(self, metrics: &crate::GrpcMetrics) -> Link {
        use tower_layer::Layer;
        Link(Inner::Metered(Box::new(metrics.client_layer().layer(self))))
    }

    /// Whether calls stay in this process.
    #[cfg(test)]
    fn is_local(&self) -> bool {
        matches!(self.0, Inner::Local { .. })
    }
}

/// Calls over the network.
impl From<Channel> for Link {
    fn from(channel: Channel) -> Link {
        Link(Inner::Remote(channel))
    }
}

fn boxed(e: tonic::transport::Error) -> BoxError {
    e.into()
}

/// A call's errors are a transport error or a [`Status`], which tonic's clients turn into the
/// call's status. A remote call's future is the channel's own, unboxed: the gateway makes one
/// per transcoded request.
impl Service<http::Request<Body>> for Link {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Either<
        MapErr<ResponseFuture, fn(tonic::transport::Error) -> BoxError>,
        BoxFuture<'static, Result<http::Response<Body>, BoxError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.0 {
            Inner::Remote(channel) => {
                Service::<http::Request<Body>>::poll_ready(channel, cx).map_err(Into::into)
            }
            Inner::Local { .. } | Inner::Pooled(_) => Poll::Ready(Ok(())),
            Inner::Metered(m) => m.poll_ready(cx),
        }
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match &mut self.0 {
            Inner::Remote(channel) => Either::Left(channel.call(req).map_err(boxed as fn(_) -> _)),
            Inner::Local { slot, timeout } => {
                Either::Right(Box::pin(call_local(slot.clone(), *timeout, req)))
            }
            Inner::Pooled(pool) => Either::Right(Box::pin(call_pooled(pool.clone(), req))),
            Inner::Metered(m) => Either::Right(m.call(req)),
        }
    }
}

/// Whether a call's error means it never reached the service (or lost it mid-call): the
/// member is taken out of rotation.
fn unreachable(e: &BoxError) -> bool {
    e.is::<tonic::transport::Error>()
        || e.downcast_ref::<Status>()
            .is_some_and(|s| s.code() == tonic::Code::Unavailable)
}

async fn call_pooled(
    pool: Arc<Pool>,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, BoxError> {
    let Some(member) = pool.first() else {
        return Err(Box::new(Status::unavailable(
            "no replica of the service is known yet",
        )));
    };
    let mut link = member.link().clone();
    let result = match std::future::poll_fn(|cx| link.poll_ready(cx)).await {
        Ok(()) => link.call(req).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &result
        && unreachable(e)
    {
        member.eject();
    }
    result
}

/// Aborts the handler's task when the caller stops waiting for it.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn call_local(
    slot: Arc<Slot>,
    timeout: Duration,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, BoxError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let served = slot.serving(deadline).await?;
    let mut routes = served.routes;
    let mut task = AbortOnDrop(served.runtime.spawn(async move {
        std::future::poll_fn(|cx| Service::<http::Request<Body>>::poll_ready(&mut routes, cx))
            .await?;
        routes.call(req).await
    }));
    match tokio::time::timeout_at(deadline, &mut task.0).await {
        Ok(Ok(Ok(response))) => Ok(response),
        Ok(Ok(Err(never))) => match never {},
        Ok(Err(e)) => Err(Box::new(Status::internal(format!(
            "the {} service's handler failed: {e}",
            slot.addr
        )))),
        Err(_) => Err(Box::new(Status::deadline_exceeded(format!(
            "the service at {} did not answer within {} ms",
            slot.addr,
            timeout.as_millis()
        )))),
    }
}

#[derive(Clone)]
struct Served {
    routes: Routes,
    /// The runtime the service runs on: its handlers run there, whoever calls.
    runtime: tokio::runtime::Handle,
}

enum State {
    Starting,
    Serving(Served),
    Stopped,
}

/// One address this process serves.
struct Slot {
    addr: SocketAddr,
    state: RwLock<State>,
    changed: tokio::sync::Notify,
}

impl Slot {
    /// The routes, once served; a call that comes in during start-up waits for them until
    /// `deadline`, as a connection to a server that is starting would.
    async fn serving(&self, deadline: tokio::time::Instant) -> Result<Served, BoxError> {
        loop {
            let changed = self.changed.notified();
            match &*self.state.read().unwrap_or_else(|p| p.into_inner()) {
                State::Serving(s) => return Ok(s.clone()),
                State::Stopped => {
                    return Err(Box::new(Status::unavailable(format!(
                        "the service at {} has stopped",
                        self.addr
                    ))));
                }
                State::Starting => {}
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(Box::new(Status::unavailable(format!(
                    "the service at {} is still starting",
                    self.addr
                ))));
            }
        }
    }

    fn set(&self, state: State) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.changed.notify_waiters();
    }
}

/// The gRPC addresses this process serves itself, and their routes once they are served.
/// Cloning shares it.
#[derive(Clone, Default)]
pub struct LocalServices(Arc<Mutex<HashMap<SocketAddr, Arc<Slot>>>>);

impl std::fmt::Debug for LocalServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_set().entries(map.keys()).finish()
    }
}

impl LocalServices {
    /// This process will serve gRPC at `addr` (a bound listener's address): links to it made
    /// from now on are local.
    pub fn declare(&self, addr: SocketAddr) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(Slot {
                    addr,
                    state: RwLock::new(State::Starting),
                    changed: tokio::sync::Notify::new(),
                })
            });
    }

    fn slot(&self, addr: SocketAddr) -> Option<Arc<Slot>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .cloned()
    }

    /// `routes` now answer at `addr`, on the current runtime. Nothing happens for an address
    /// that was not declared.
    pub fn serve(&self, addr: SocketAddr, routes: Routes) {
        if let Some(slot) = self.slot(addr) {
            slot.set(State::Serving(Served {
                routes,
                runtime: tokio::runtime::Handle::current(),
            }));
        }
    }

    /// The service at `addr` has stopped: local calls to it fail as unavailable.
    pub fn stop(&self, addr: SocketAddr) {
        if let Some(slot) = self.slot(addr) {
            slot.set(State::Stopped);
        }
    }

    /// A local link to `url` (`http://host:port`) if this process serves that address, with
    /// calls bounded by `timeout`; `None` means: call it over the network.
    pub fn link(&self, url: &str, timeout: Duration) -> Option<Link> {
        let host_port = url
            .strip_prefix("http://")?
            .trim_end_matches('/')
            .parse::<SocketAddr>()
            .ok()?;
        let slot = self.slot(host_port)?;
        Some(Link(Inner::Local { slot, timeout }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    fn addr() -> SocketAddr {
        "127.0.0.1:50999".parse().expect("addr")
    }

    async fn health_routes(status: tonic_health::ServingStatus) -> Routes {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_service_status("x.Y", status).await;
        Routes::new(health)
    }

    /// A link to `addr()`, which a fresh registry declares local.
    fn declared(timeout: Duration) -> (LocalServices, Link) {
        let local = LocalServices::default();
        local.declare(addr());
        let link = local
            .link("http://127.0.0.1:50999", timeout)
            .expect("declared");
        (local, link)
    }

    async fn check(link: Link, service: &str) -> Result<ServingStatus, Status> {
        let mut client = HealthClient::new(link);
        let r = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?;
        Ok(r.get_ref().status())
    }

    #[test]
    fn only_declared_http_addresses_are_local() {
        let local = LocalServices::default();
        local.declare(addr());
        let t = Duration::from_secs(1);
        assert!(local.link("http://127.0.0.1:50999", t).is_some());
        assert!(local.link("http://127.0.0.1:50999/", t).is_some());
        assert!(local.link("http://127.0.0.1:50998", t).is_none());
        assert!(local.link("https://127.0.0.1:50999", t).is_none());
        assert!(local.link("http://localhost:50999", t).is_none());
    }

    #[tokio::test]
    async fn a_local_call_reaches_the_routes_with_their_status_codes() {
        let (local, link) = declared(Duration::from_secs(2));
        local.serve(
            addr(),
            health_routes(tonic_health::ServingStatus::Serving).await,
        );
        assert!(link.is_local());
        assert_eq!(
            check(link.clone(), "x.Y").await.expect("answered"),
            ServingStatus::Serving
        );
        let unknown = check(link, "no.Such").await.expect_err("not known");
        assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    }

    #[tokio::test]
    async fn a_call_during_start_up_waits_for_the_service_and_one_after_stop_fails() {
        let (local, link) = declared(Duration::from_secs(5));
        let early = tokio::spawn(check(link.clone(), "x.Y"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!early.is_finished(), "waits while the service starts");
        local.serve(
            addr(),
            health_routes(tonic_health::ServingStatus::Serving).await,
        );
        assert_eq!(
            early.await.expect("task").expect("answered once served"),
            ServingStatus::Serving
        );
        local.stop(addr());
        let after = check(link, "x.Y").await.expect_err("stopped");
        assert_eq!(after.code(), tonic::Code::Unavailable, "{after:?}");
    }

    #[tokio::test]
    async fn a_service_that_never_starts_is_unavailable_after_the_timeout() {
        let (_local, link) = declared(Duration::from_millis(100));
        let err = check(link, "x.Y").await.expect_err("never served");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    }

    /// Sets its flag when dropped: the handler's future was dropped (aborted) before it ended.
    struct Dropped(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A handler that never answers.
    #[derive(Clone)]
    struct Stuck(Arc<std::sync::atomic::AtomicBool>);
    impl tonic::server::NamedService for Stuck {
        const NAME: &'static str = "x.Stuck";
    }
    impl Service<http::Request<Body>> for Stuck {
        type Response = http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<'static, Result<http::Response<Body>, std::convert::Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            let guard = Dropped(self.0.clone());
            Box::pin(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok(http::Response::new(Body::empty()))
            })
        }
    }

    #[tokio::test]
    async fn a_handler_past_the_timeout_is_deadline_exceeded_and_aborted() {
        let aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (local, mut link) = declared(Duration::from_millis(100));
        local.serve(addr(), Routes::new(Stuck(aborted.clone())));
        let req = http::Request::builder()
            .uri("/x.Stuck/Call")
            .body(Body::empty())
            .expect("request");
        let err = link.call(req).await.expect_err("never answers");
        let status = err.downcast_ref::<Status>().expect("a status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        for _ in 0..200 {
            if aborted.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the handler kept running after its caller gave up");
    }
}
