//! How ShopVerse processes talk gRPC.
//!
//! - [`link`]: the transport of every client: a network channel, a call into routes this
//!   process serves itself, or a [`Pool`] of replicas.
//! - [`pool`]: a service's replicas, health-checked, round robin over the healthy ones; the
//!   services reach each other through it and the gateway reaches the services through it.
//! - [`metrics`]: per-call counts and times, server and client side, under go-grpc-prometheus's
//!   names.
//! - [`server`]: the tonic bootstrap: gRPC health and reflection next to the service, bound to a
//!   listener the caller made (port 0 in tests), graceful shutdown with a bounded grace period.

#![forbid(unsafe_code)]

pub mod link;
pub mod metrics;
pub mod pool;
pub mod server;

pub use link::{BoxError, Link, LocalServices};
pub use metrics::GrpcMetrics;
pub use pool::{Member, Pool, PoolError, Target};
