//! The gRPC server bootstrap every service uses.
//!
//! [`serve_grpc`] puts gRPC health (`grpc.health.v1`) and reflection (v1 and v1alpha, so every
//! `grpcurl` works) next to the service's own routes, serves them on a listener the caller bound
//! (port 0 in tests), and on shutdown marks the services NOT_SERVING, stops accepting, and waits
//! for in-flight calls no longer than the grace period. When the process declared the listener's
//! address local ([`LocalServices`]), the same routes also answer in-process calls.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::link::LocalServices;
use crate::metrics::GrpcMetrics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reading the listener's address: {0}")]
    Listener(#[from] std::io::Error),
}

/// Binds `addr`, with a clear error when the address is taken.
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))
}

/// Serves `routes` plus health and reflection until `shutdown` is cancelled. `services` are the
/// fully qualified gRPC service names reported as SERVING (e.g. `shopverse.users.v1.UsersService`).
/// In-process calls reach the routes too if `local` declared the listener's address.
pub async fn serve_grpc(
    listener: TcpListener,
    routes: Routes,
    services: &[&str],
    local: &LocalServices,
    metrics: &GrpcMetrics,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in services {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    // Reflection advertises only what this server serves, though the descriptor set holds
    // every ShopVerse service (its files stay resolvable for clients).
    let advertised: Vec<String> = services
        .iter()
        .map(|s| (*s).to_owned())
        .chain(["grpc.health.v1.Health".to_owned()])
        .collect();
    let reflection = || {
        advertised.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(shopverse_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(name.clone()),
        )
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let routes = routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // Metered below the network server, so in-process calls are counted too.
    let routes = Routes::from(routes.into_axum_router().layer(metrics.server_layer()));
    local.serve(addr, routes.clone());

    let stop = shutdown.clone();
    let local = local.clone();
    let names: Vec<String> = services.iter().map(|s| (*s).to_owned()).collect();
    let signal = async move {
        stop.cancelled().await;
        local.stop(addr);
        for name in &names {
            reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    };
    let server = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => res?,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over; dropping open calls");
        }
    }
    Ok(())
}
