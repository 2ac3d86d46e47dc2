//! The demo: a catalog (`shopverse seed`), and a customer with orders placed through the
//! running services (`shopverse seed --orders`, `shopverse up --demo`).

use std::net::SocketAddr;
use std::sync::Arc;

use shopverse_kit::SystemClock;
use shopverse_products::ProductsService;
use shopverse_runtime::{RunError, ServiceConfig};

use crate::config::AppConfig;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Open(#[from] RunError),
    #[error("counting products: {0}")]
    Count(#[from] sqlx::Error),
    #[error("seeding: {0}")]
    Seed(#[from] shopverse_kit::ServiceError),
    #[error(
        "placing demo orders: cannot connect to {0}; are the services running at those addresses? ({1})"
    )]
    Connect(SocketAddr, #[source] tonic::transport::Error),
    #[error("placing demo orders: {0}")]
    Call(#[from] tonic::Status),
    #[error("the demo customer vanished")]
    Vanished,
}

/// What [`seed`] added.
pub type SeedReport = shopverse_products::seed::SeedReport;

/// The products service over its database, without a server: what seeding writes through.
async fn products_alone(
    cfg: &AppConfig,
) -> Result<(shopverse_storage::Db, shopverse_products::Products), DemoError> {
    let db = shopverse_runtime::open_db::<ProductsService>(&cfg.services.products, &cfg.data.dir)
        .await?;
    let products = shopverse_products::Products::standalone(
        db.clone(),
        cfg.services.products.clone(),
        Arc::new(SystemClock),
    );
    Ok((db, products))
}

/// Adds the demo catalog to the products database; existing categories and products stay.
pub async fn seed(cfg: &AppConfig) -> Result<SeedReport, DemoError> {
    let (db, products) = products_alone(cfg).await?;
    let report = shopverse_products::seed::seed_demo(&products).await;
    db.close().await;
    Ok(report?)
}

/// Makes sure the synthetic catalog's first `total` products exist (`shopverse seed
/// --products`); `progress(done, to_do)` after each batch.
pub async fn seed_products(
    cfg: &AppConfig,
    total: u64,
    progress: impl FnMut(u64, u64),
) -> Result<shopverse_products::bulk::BulkReport, DemoError> {
    let (db, products) = products_alone(cfg).await?;
    let report = shopverse_products::bulk::seed_products(&products, total, progress).await;
    db.close().await;
    Ok(report?)
}

/// Whether the products database holds no product.
pub async fn catalog_is_empty(cfg: &AppConfig) -> Result<bool, DemoError> {
    let db = shopverse_runtime::open_db::<ProductsService>(&cfg.services.products, &cfg.data.dir)
        .await?;
    let n = shopverse_products::store::Repo { db: db.clone() }
        .count_products()
        .await;
    db.close().await;
    Ok(n? == 0)
}

/// Where [`seed`] writes, as shown (password removed).
pub fn catalog_url(cfg: &AppConfig) -> String {
    shopverse_storage::redact(&cfg.services.products.database_url(&cfg.data.dir))
}

pub const DEMO_EMAIL: &str = "demo@shopverse.example";
pub const DEMO_PASSWORD: &str = "demo password 1234";

/// A demo customer with three orders (two paid, one declined), placed through the services'
/// own APIs at these addresses; idempotent: a customer who already has orders gets no more.
/// What it did, as one line.
pub async fn place_orders(
    users: SocketAddr,
    products: SocketAddr,
    orders: SocketAddr,
) -> Result<String, DemoError> {
    use shopverse_kit::Role;
    use shopverse_kit::identity::request_as as as_user;
    use shopverse_proto::orders::v1 as o;
    use shopverse_proto::products::v1 as p;
    use shopverse_proto::users::v1 as u;
    let ch = |a: SocketAddr| async move {
        let connect = |e| DemoError::Connect(a, e);
        tonic::transport::Endpoint::from_shared(format!("http://{a}"))
            .map_err(connect)?
            .connect()
            .await
            .map_err(connect)
    };
    let mut users = u::users_service_client::UsersServiceClient::new(ch(users).await?);
    let registered = users
        .register(u::RegisterRequest {
            email: DEMO_EMAIL.into(),
            password: DEMO_PASSWORD.into(),
            display_name: "Demo Customer".into(),
        })
        .await;
    let user_id = match registered {
        Ok(r) => r.into_inner().user.map(|u| u.id).unwrap_or_default(),
        Err(e) if e.code() == tonic::Code::AlreadyExists => {
            let found = users
                .list_users(as_user(
                    u::ListUsersRequest {
                        email: DEMO_EMAIL.into(),
                        ..Default::default()
                    },
                    "shopverse-cli",
                    &[Role::Admin],
                ))
                .await?
                .into_inner();
            found
                .users
                .first()
                .map(|u| u.id.clone())
                .ok_or(DemoError::Vanished)?
        }
        Err(e) => return Err(e.into()),
    };
    let me = |m| as_user(m, &user_id, &[Role::Customer]);
    let mut orders = o::orders_service_client::OrdersServiceClient::new(ch(orders).await?);
    let existing = orders
        .list_my_orders(me(o::ListMyOrdersRequest::default()))
        .await?
        .into_inner()
        .orders
        .len();
    if existing == 0 {
        let mut catalog =
            p::products_service_client::ProductsServiceClient::new(ch(products).await?);
        let picks = catalog
            .list_products(p::ListProductsRequest {
                page_size: 3,
                ..Default::default()
            })
            .await?
            .into_inner()
            .products;
        for (i, (product, token)) in picks
            .iter()
            .zip(["pm_card_ok", "pm_card_ok", "pm_card_declined"])
            .enumerate()
        {
            orders
                .add_cart_item(as_user(
                    o::AddCartItemRequest {
                        product_id: product.id.clone(),
                        quantity: 1,
                    },
                    &user_id,
                    &[Role::Customer],
                ))
                .await?;
            orders
                .checkout(as_user(
                    o::CheckoutRequest {
                        shipping_address: Some(shopverse_proto::common::v1::Address {
                            recipient: "Demo Customer".into(),
                            line1: "1 Example Street".into(),
                            city: "Berlin".into(),
                            postal_code: "10115".into(),
                            country: "DE".into(),
                            ..Default::default()
                        }),
                        payment_method_token: token.into(),
                        idempotency_key: format!("demo-order-{i}"),
                    },
                    &user_id,
                    &[Role::Customer],
                ))
                .await?;
        }
    }
    let n = orders
        .list_my_orders(me(o::ListMyOrdersRequest::default()))
        .await?
        .into_inner()
        .orders
        .len();
    Ok(format!(
        "demo: customer {DEMO_EMAIL} (password \"{DEMO_PASSWORD}\") has {n} orders"
    ))
}
