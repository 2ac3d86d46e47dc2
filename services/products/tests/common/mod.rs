//! What the products service's tests share: a server on port 0 over SQLite or PostgreSQL, and
//! requests as an admin.

#![allow(dead_code)] // each test file uses its own part

use std::sync::Arc;

use shopverse_events::embedded::EmbeddedLog;
use shopverse_kit::testing::{Spawned, as_user, channel, spawn};
use shopverse_kit::{Role, SystemClock};
use shopverse_products::ProductsConfig;
use shopverse_proto::common::v1::Money;
use shopverse_proto::products::v1::products_service_client::ProductsServiceClient;
use shopverse_proto::products::v1::*;
use tonic::transport::Channel;

pub struct Running {
    pub client: ProductsServiceClient<Channel>,
    pub server: Spawned<shopverse_runtime::RunError>,
    pub log: EmbeddedLog,
    _dir: tempfile::TempDir,
}

pub async fn start(database: Option<&str>) -> Running {
    start_with(database, ProductsConfig::default()).await
}

pub async fn start_with(database: Option<&str>, config: ProductsConfig) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let (platform, log) = shopverse_runtime::testing::platform(dir.path(), Arc::new(SystemClock))
        .await
        .expect("platform");
    let config = ProductsConfig {
        database: database.unwrap_or_default().to_owned(),
        ..config
    };
    let data = dir.path().to_owned();
    let server = spawn(|listener, stop| async move {
        shopverse_runtime::serve::<shopverse_products::ProductsService>(
            listener, config, &data, platform, stop,
        )
        .await
    })
    .await
    .expect("bind");
    let client = ProductsServiceClient::new(channel(server.addr).await.expect("connect"));
    Running {
        client,
        server,
        log,
        _dir: dir,
    }
}

pub fn admin<T>(m: T) -> tonic::Request<T> {
    as_user(m, "admin-1", &[Role::Admin])
}

pub fn eur(cents: i64) -> Option<Money> {
    Some(Money {
        amount_minor: cents,
        currency: "EUR".into(),
    })
}

pub fn new_product(
    sku: &str,
    name: &str,
    cents: i64,
    category: &str,
    stock: i64,
) -> CreateProductRequest {
    CreateProductRequest {
        sku: sku.into(),
        name: name.into(),
        description: format!("{name}, described"),
        price: eur(cents),
        category_id: category.into(),
        initial_stock: stock,
        ..Default::default()
    }
}

pub async fn category(c: &mut ProductsServiceClient<Channel>, name: &str, parent: &str) -> String {
    c.create_category(admin(CreateCategoryRequest {
        name: name.into(),
        slug: String::new(),
        parent_id: parent.into(),
    }))
    .await
    .expect("category")
    .into_inner()
    .id
}

pub async fn list_all(
    c: &mut ProductsServiceClient<Channel>,
    mut req: ListProductsRequest,
) -> Vec<Product> {
    let mut out = Vec::new();
    loop {
        let page = c
            .list_products(req.clone())
            .await
            .expect("list")
            .into_inner();
        out.extend(page.products);
        if page.next_page_token.is_empty() {
            return out;
        }
        req.page_token = page.next_page_token;
    }
}

pub async fn create(c: &mut ProductsServiceClient<Channel>, p: CreateProductRequest) -> Product {
    c.create_product(admin(p))
        .await
        .expect("create")
        .into_inner()
}
