//! The products service: the category tree, the catalog and the stock behind it.
//!
//! # Layout
//! Dependencies run `grpc`/`events` → `app` → `store`/`domain`:
//! - [`config`]: the `services.products` section.
//! - [`store`]: all SQL (SQLite or PostgreSQL, the same statements but for the text index:
//!   FTS5 tables there, `tsvector` columns here).
//! - [`domain`]: the catalog's rules: prices, names, SKUs, attributes, images, slugs, the
//!   category tree.
//! - [`search`]: search's rules without SQL: words, index expressions, the score, price
//!   bands, typo candidates.
//! - [`app`]: the use cases: admin edits with optimistic concurrency, stock reservation for
//!   orders; `listing` (private): browsing and search with filters, facets and page tokens.
//! - [`grpc`]: `shopverse.products.v1.ProductsService`, mapping only.
//! - [`events`]: the consumer that commits or releases stock when an order ends.
//! - [`seed`]: the demo catalog (`shopverse seed`, `shopverse up --demo`); [`bulk`]: a
//!   synthetic catalog of any size (`shopverse seed --products N`).
//!
//! Stock never goes negative: a reservation is one conditional `UPDATE … WHERE available >= n`
//! per line inside one transaction, so concurrent reservations cannot both take the last unit.

#![forbid(unsafe_code)]

pub mod app;
pub mod bulk;
pub mod config;
pub mod domain;
pub mod events;
pub mod grpc;
mod listing;
pub mod search;
pub mod seed;
pub mod store;

use tonic::service::Routes;

use shopverse_runtime::{Context, RunError, Service};
use shopverse_storage::MigrationSpec;

pub use app::Products;
pub use config::ProductsConfig;

pub const SERVICE_NAME: &str = "shopverse.products.v1.ProductsService";

pub const MIGRATIONS: &[MigrationSpec] = &[
    (
        1,
        "catalog and stock",
        include_str!("../migrations/0001_catalog.sql"),
    ),
    (
        2,
        "search, facets and attribute filters",
        include_str!("../migrations/0002_search.sql"),
    ),
];

/// The products service, as [`shopverse_runtime::serve`] runs it: the gRPC server, the relay,
/// and the consumer that settles stock when orders end.
pub struct ProductsService;

impl Service for ProductsService {
    const NAME: &'static str = "products";
    const GRPC_NAME: &'static str = SERVICE_NAME;
    const MIGRATIONS: &'static [MigrationSpec] = MIGRATIONS;
    type Config = ProductsConfig;

    async fn build(cx: &mut Context<ProductsConfig>) -> Result<Routes, RunError> {
        let products = Products::new(
            cx.db.clone(),
            cx.config.clone(),
            &cx.platform,
            cx.relay_waker(),
        );
        let indexed = products
            .index_catalog()
            .await
            .map_err(|e| RunError::new("search index", e))?;
        if indexed > 0 {
            tracing::info!(products = indexed, "indexed products for search");
        }
        cx.consume(events::StockSettler::new(products.clone()));
        Ok(Routes::new(products.into_server()))
    }
}
