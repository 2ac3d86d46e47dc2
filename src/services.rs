//! The one table of services: everything the process knows of each is its [`Unit`], made from
//! its [`Service`] impl and the section of the configuration it reads. Adding a service is a
//! row here and a section in [`ServicesConfig`].

use std::net::SocketAddr;

use futures::future::BoxFuture;
use tokio::net::TcpListener;

use shopverse_kit::CancellationToken;
use shopverse_runtime::{Platform, RunError, Service, ServiceConfig};

use crate::config::{AppConfig, ServicesConfig};

/// A service as the process runs it, whatever its configuration type.
pub trait Unit: Send + Sync {
    /// Its short name (`orders`).
    fn name(&self) -> &'static str;
    /// Its fully qualified gRPC service name.
    fn grpc_name(&self) -> &'static str;
    /// Its configured listen address.
    fn listen(&self, cfg: &AppConfig) -> SocketAddr;
    /// Its database URL.
    fn database_url(&self, cfg: &AppConfig) -> String;
    /// Runs it on `listener` until `stop`.
    fn start(
        &self,
        cfg: &AppConfig,
        listener: TcpListener,
        platform: Platform,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Result<(), RunError>>;
}

/// Service `S`, reading its section through `section`.
struct Of<S: Service>(fn(&ServicesConfig) -> &S::Config);

impl<S: Service> Unit for Of<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }
    fn grpc_name(&self) -> &'static str {
        S::GRPC_NAME
    }
    fn listen(&self, cfg: &AppConfig) -> SocketAddr {
        (self.0)(&cfg.services).listen()
    }
    fn database_url(&self, cfg: &AppConfig) -> String {
        (self.0)(&cfg.services).database_url(&cfg.data.dir)
    }
    fn start(
        &self,
        cfg: &AppConfig,
        listener: TcpListener,
        platform: Platform,
        stop: CancellationToken,
    ) -> BoxFuture<'static, Result<(), RunError>> {
        let config = (self.0)(&cfg.services).clone();
        let dir = cfg.data.dir.clone();
        Box::pin(async move {
            shopverse_runtime::serve::<S>(listener, config, &dir, platform, stop).await
        })
    }
}

/// Every service, in the order the appliance starts them.
pub static ALL: [&dyn Unit; 6] = [
    &Of::<shopverse_users::UsersService>(|s| &s.users),
    &Of::<shopverse_products::ProductsService>(|s| &s.products),
    &Of::<shopverse_orders::OrdersService>(|s| &s.orders),
    &Of::<shopverse_payments::PaymentsService>(|s| &s.payments),
    &Of::<shopverse_notifications::NotificationsService>(|s| &s.notifications),
    &Of::<shopverse_delivery::DeliveryService>(|s| &s.delivery),
];

/// The service called `name`.
pub fn named(name: &str) -> Option<&'static dyn Unit> {
    ALL.iter().copied().find(|u| u.name() == name)
}

/// The names of every service, for the command line.
pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|u| u.name()).collect()
}
