//! The gRPC service `shopverse.products.v1.ProductsService`.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Notify;

use shopverse_events::envelope::{
    Envelope, EventType, Origin, PRODUCT_ARCHIVED, PRODUCT_CREATED, PRODUCT_UPDATED, STOCK_CHANGED,
    new_envelope,
};
use shopverse_events::outbox::{enqueue, enqueue_all};
use shopverse_kit::clock::to_timestamp;
use shopverse_kit::identity::Identity;
use shopverse_kit::{Clock, ServiceError};
use shopverse_proto::common::v1::Money;
use shopverse_proto::products::v1::products_service_server::ProductsServiceServer;
use shopverse_proto::products::v1::*;
use shopverse_runtime::Platform;
use shopverse_storage::Db;
use shopverse_storage::is_unique_violation;

use crate::config::ProductsConfig;
use crate::domain::*;
use crate::store::{CategoryRow, ProductRow, Repo, StockRow};

const SOURCE: &str = "products";
pub const MAX_RESERVATION_LINES: usize = 100;

pub(crate) struct Inner {
    pub(crate) repo: Repo,
    pub(crate) config: ProductsConfig,
    pub(crate) clock: Arc<dyn Clock>,
    relay_wake: Arc<Notify>,
}

#[derive(Clone)]
pub struct Products {
    inner: Arc<Inner>,
}

pub fn product_to_proto(p: &ProductRow) -> Product {
    Product {
        id: p.id.clone(),
        sku: p.sku.clone(),
        name: p.name.clone(),
        description: p.description.clone(),
        price: Some(Money {
            amount_minor: p.price_minor,
            currency: p.currency.clone(),
        }),
        category_id: p.category_id.clone().unwrap_or_default(),
        attributes: p
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        image_urls: p.image_urls.clone(),
        active: p.active,
        version: p.version,
        created_at: Some(to_timestamp(p.created_at)),
        updated_at: Some(to_timestamp(p.updated_at)),
    }
}

pub(crate) fn stock_to_proto(product_id: &str, s: StockRow) -> Stock {
    Stock {
        product_id: product_id.to_owned(),
        available: s.available,
        reserved: s.reserved,
    }
}

impl Products {
    pub fn new(
        db: Db,
        config: ProductsConfig,
        platform: &Platform,
        relay_wake: Arc<Notify>,
    ) -> Products {
        Products {
            inner: Arc::new(Inner {
                repo: Repo { db },
                config,
                clock: platform.clock.clone(),
                relay_wake,
            }),
        }
    }

    /// A service over `db` with no relay to wake (the seed and tests).
    pub fn standalone(db: Db, config: ProductsConfig, clock: Arc<dyn Clock>) -> Products {
        Products {
            inner: Arc::new(Inner {
                repo: Repo { db },
                config,
                clock,
                relay_wake: Arc::new(Notify::new()),
            }),
        }
    }

    pub fn into_server(self) -> ProductsServiceServer<Products> {
        ProductsServiceServer::new(self)
    }

    pub(crate) fn now(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    pub(crate) fn repo(&self) -> &Repo {
        &self.inner.repo
    }

    pub(crate) async fn emit_product(
        &self,
        conn: &mut sqlx::AnyConnection,
        kind: &EventType,
        p: &ProductRow,
    ) -> Result<(), sqlx::Error> {
        let payload = ProductChanged {
            product: Some(product_to_proto(p)),
        };
        let env = new_envelope(kind, SOURCE, &p.id, self.now(), Origin::NONE, &payload);
        enqueue(conn, kind, &env).await
    }

    pub(crate) async fn emit_stock(
        &self,
        conn: &mut sqlx::AnyConnection,
        product_id: &str,
        reason: &str,
        order_id: &str,
    ) -> Result<(), sqlx::Error> {
        match self.repo().stock(conn, product_id).await? {
            Some(s) => {
                let env = self.stock_event(product_id, s, reason, order_id);
                enqueue(conn, &STOCK_CHANGED, &env).await
            }
            None => Ok(()),
        }
    }

    /// The `stock.changed` event of `product_id` at stock `s`. One caused by an order's
    /// reservation moving (reserved, committed, released) happens once per order, product and
    /// reason, and its id says so: settling the same order twice raises the same event.
    pub(crate) fn stock_event(
        &self,
        product_id: &str,
        s: StockRow,
        reason: &str,
        order_id: &str,
    ) -> Envelope {
        let payload = StockChanged {
            stock: Some(stock_to_proto(product_id, s)),
            reason: reason.to_owned(),
            order_id: order_id.to_owned(),
        };
        let key = format!("{reason}/{order_id}");
        let origin = if order_id.is_empty() {
            Origin::NONE
        } else {
            Origin::Keyed {
                key: &key,
                traceparent: None,
            }
        };
        new_envelope(
            &STOCK_CHANGED,
            SOURCE,
            product_id,
            self.now(),
            origin,
            &payload,
        )
    }

    pub async fn list_categories(&self) -> Result<Vec<Category>, ServiceError> {
        Ok(tree_order(self.repo().categories().await?)
            .into_iter()
            .map(|c| Category {
                id: c.id,
                name: c.name,
                slug: c.slug,
                parent_id: c.parent_id.unwrap_or_default(),
            })
            .collect())
    }

    pub async fn create_category(
        &self,
        req: CreateCategoryRequest,
    ) -> Result<Category, ServiceError> {
        let name = check_text("name", &req.name, 1, 100)?;
        let slug = if req.slug.trim().is_empty() {
            slugify(&name)
        } else {
            req.slug.trim().to_owned()
        };
        if slug.is_empty()
            || slug.len() > 100
            || !slug
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(ServiceError::invalid(
                "slug",
                "must be lowercase letters, digits and dashes",
            ));
        }
        let parent_id = if req.parent_id.is_empty() {
            None
        } else {
            let cats = self.repo().categories().await?;
            if !cats.iter().any(|c| c.id == req.parent_id) {
                return Err(ServiceError::not_found("category", &req.parent_id));
            }
            Some(req.parent_id.clone())
        };
        let row = CategoryRow {
            id: uuid::Uuid::now_v7().to_string(),
            name,
            slug,
            parent_id,
        };
        match self.repo().insert_category(&row, self.now()).await {
            Ok(()) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(ServiceError::AlreadyExists(format!(
                    "a category with slug `{}` exists",
                    row.slug
                )));
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Category {
            id: row.id,
            name: row.name,
            slug: row.slug,
            parent_id: row.parent_id.unwrap_or_default(),
        })
    }

    /// A product the caller may see: archived ones only for admins.
    pub(crate) fn visible(
        p: Option<ProductRow>,
        caller: Option<&Identity>,
        what: &str,
    ) -> Result<ProductRow, ServiceError> {
        match p {
            Some(p) if p.active || caller.is_some_and(Identity::is_admin) => Ok(p),
            _ => Err(ServiceError::not_found("product", what)),
        }
    }

    pub async fn get_product(
        &self,
        id: &str,
        caller: Option<&Identity>,
    ) -> Result<ProductRow, ServiceError> {
        if id.is_empty() {
            return Err(ServiceError::invalid("id", "is required"));
        }
        let mut conn = self.repo().db.read().await?;
        Self::visible(self.repo().product(&mut conn, id).await?, caller, id)
    }

    pub async fn create_product(
        &self,
        req: CreateProductRequest,
    ) -> Result<ProductRow, ServiceError> {
        let sku = check_sku(&req.sku)?;
        let name = check_text("name", &req.name, 1, 200)?;
        let description = check_text("description", &req.description, 0, 5000)?;
        let price = req
            .price
            .ok_or_else(|| ServiceError::invalid("price", "is required"))?;
        check_money("price", &price, self.config().max_price_minor)?;
        if req.initial_stock < 0 {
            return Err(ServiceError::invalid(
                "initial_stock",
                "must not be negative",
            ));
        }
        let category_id = if req.category_id.is_empty() {
            None
        } else {
            if !self
                .repo()
                .categories()
                .await?
                .iter()
                .any(|c| c.id == req.category_id)
            {
                return Err(ServiceError::invalid(
                    "category_id",
                    format!("no category {}", req.category_id),
                ));
            }
            Some(req.category_id.clone())
        };
        let now = self.now();
        let p = ProductRow {
            id: uuid::Uuid::now_v7().to_string(),
            sku,
            name,
            description,
            price_minor: price.amount_minor,
            currency: price.currency,
            category_id,
            attributes: check_attributes(&req.attributes)?,
            image_urls: check_images(&req.image_urls)?,
            active: true,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        let mut tx = self.repo().db.begin_write().await?;
        match self.repo().insert_product(&mut tx, &p).await {
            Ok(()) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(ServiceError::AlreadyExists(format!(
                    "a product with sku `{}` exists",
                    p.sku
                )));
            }
            Err(e) => return Err(e.into()),
        }
        self.repo()
            .insert_stock(&mut tx, &p.id, req.initial_stock)
            .await?;
        self.emit_product(&mut tx, &PRODUCT_CREATED, &p).await?;
        self.emit_stock(&mut tx, &p.id, "set", "").await?;
        tx.commit().await?;
        self.inner.relay_wake.notify_one();
        Ok(p)
    }

    /// Reads the product to change in `tx`, checking the caller's version.
    pub(crate) async fn for_update(
        &self,
        tx: &mut sqlx::AnyConnection,
        id: &str,
        expected: i64,
    ) -> Result<ProductRow, ServiceError> {
        if id.is_empty() {
            return Err(ServiceError::invalid("id", "is required"));
        }
        if expected <= 0 {
            return Err(ServiceError::invalid(
                "expected_version",
                "is required: the version you read",
            ));
        }
        let p = self
            .repo()
            .product(tx, id)
            .await?
            .ok_or_else(|| ServiceError::not_found("product", id))?;
        if p.version != expected {
            return Err(ServiceError::FailedPrecondition(format!(
                "stale version: product {id} is at version {}, the update was based on {expected}",
                p.version
            )));
        }
        if !p.active {
            return Err(ServiceError::FailedPrecondition(format!(
                "product {id} is archived"
            )));
        }
        Ok(p)
    }

    /// Writes `p`, read as `old` in `tx`, as the version after `expected`.
    pub(crate) async fn save(
        &self,
        mut tx: shopverse_storage::WriteTx,
        old: &ProductRow,
        mut p: ProductRow,
        expected: i64,
        kind: &EventType,
    ) -> Result<ProductRow, ServiceError> {
        p.version = expected + 1;
        p.updated_at = self.now();
        if !self
            .repo()
            .update_product(&mut tx, old, &p, expected)
            .await?
        {
            return Err(ServiceError::FailedPrecondition(format!(
                "stale version: product {} changed while this update ran",
                p.id
            )));
        }
        self.emit_product(&mut tx, kind, &p).await?;
        tx.commit().await?;
        self.inner.relay_wake.notify_one();
        Ok(p)
    }

    pub async fn update_product(
        &self,
        req: UpdateProductRequest,
    ) -> Result<ProductRow, ServiceError> {
        let mut tx = self.repo().db.begin_write().await?;
        let old = self
            .for_update(&mut tx, &req.id, req.expected_version)
            .await?;
        let mut p = old.clone();
        if let Some(name) = &req.name {
            p.name = check_text("name", name, 1, 200)?;
        }
        if let Some(d) = &req.description {
            p.description = check_text("description", d, 0, 5000)?;
        }
        if let Some(price) = &req.price {
            check_money("price", price, self.config().max_price_minor)?;
            p.price_minor = price.amount_minor;
            p.currency = price.currency.clone();
        }
        if let Some(c) = &req.category_id {
            p.category_id = if c.is_empty() {
                None
            } else {
                if !self.repo().categories().await?.iter().any(|x| &x.id == c) {
                    return Err(ServiceError::invalid(
                        "category_id",
                        format!("no category {c}"),
                    ));
                }
                Some(c.clone())
            };
        }
        if req.replace_attributes {
            p.attributes = check_attributes(&req.attributes)?;
        } else if !req.attributes.is_empty() {
            return Err(ServiceError::invalid(
                "attributes",
                "set replace_attributes to change attributes",
            ));
        }
        if req.replace_image_urls {
            p.image_urls = check_images(&req.image_urls)?;
        } else if !req.image_urls.is_empty() {
            return Err(ServiceError::invalid(
                "image_urls",
                "set replace_image_urls to change images",
            ));
        }
        self.save(tx, &old, p, req.expected_version, &PRODUCT_UPDATED)
            .await
    }

    pub async fn archive_product(
        &self,
        req: ArchiveProductRequest,
    ) -> Result<ProductRow, ServiceError> {
        let mut tx = self.repo().db.begin_write().await?;
        let old = self
            .for_update(&mut tx, &req.id, req.expected_version)
            .await?;
        let mut p = old.clone();
        p.active = false;
        self.save(tx, &old, p, req.expected_version, &PRODUCT_ARCHIVED)
            .await
    }

    pub async fn get_stock(&self, product_id: &str) -> Result<Stock, ServiceError> {
        let mut conn = self.repo().db.read().await?;
        let s = self
            .repo()
            .stock(&mut conn, product_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("product", product_id))?;
        Ok(stock_to_proto(product_id, s))
    }

    pub async fn set_stock(&self, req: SetStockRequest) -> Result<Stock, ServiceError> {
        if req.available < 0 {
            return Err(ServiceError::invalid("available", "must not be negative"));
        }
        let mut tx = self.repo().db.begin_write().await?;
        let Some(_) = self.repo().stock(&mut tx, &req.product_id).await? else {
            return Err(ServiceError::not_found("product", &req.product_id));
        };
        self.repo()
            .set_available(&mut tx, &req.product_id, req.available)
            .await?;
        self.emit_stock(&mut tx, &req.product_id, "set", "").await?;
        let s = self.repo().stock(&mut tx, &req.product_id).await?;
        tx.commit().await?;
        self.inner.relay_wake.notify_one();
        s.map(|s| stock_to_proto(&req.product_id, s))
            .ok_or_else(|| ServiceError::not_found("product", &req.product_id))
    }

    pub(crate) fn reservation(
        order_id: &str,
        state: &str,
        lines: Vec<(String, i64)>,
    ) -> Reservation {
        let state = match state {
            "HELD" => ReservationState::Held,
            "COMMITTED" => ReservationState::Committed,
            "RELEASED" => ReservationState::Released,
            _ => ReservationState::Unspecified,
        };
        Reservation {
            order_id: order_id.to_owned(),
            state: state.into(),
            lines: lines
                .into_iter()
                .map(|(product_id, quantity)| ReservationLine {
                    product_id,
                    quantity,
                })
                .collect(),
        }
    }

    pub async fn reserve(&self, req: ReserveStockRequest) -> Result<Reservation, ServiceError> {
        let order_id = check_text("order_id", &req.order_id, 1, 100)?;
        if req.lines.is_empty() {
            return Err(ServiceError::invalid(
                "lines",
                "at least one line is required",
            ));
        }
        if req.lines.len() > MAX_RESERVATION_LINES {
            return Err(ServiceError::invalid(
                "lines",
                format!("at most {MAX_RESERVATION_LINES} lines"),
            ));
        }
        // Merge lines of the same product; the sorted order also fixes the lock order.
        let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
        for (i, l) in req.lines.iter().enumerate() {
            if l.product_id.is_empty() {
                return Err(ServiceError::invalid(
                    format!("lines[{i}].product_id"),
                    "is required",
                ));
            }
            if !(1..=10_000).contains(&l.quantity) {
                return Err(ServiceError::invalid(
                    format!("lines[{i}].quantity"),
                    "must be between 1 and 10000",
                ));
            }
            *wanted.entry(l.product_id.clone()).or_default() += l.quantity;
        }
        let wanted: Vec<(String, i64)> = wanted.into_iter().collect();
        // One retry: a concurrent identical request may win the race to insert the reservation.
        for _ in 0..2 {
            let mut tx = self.repo().db.begin_write().await?;
            // The insert comes first: a new order's reservation (every one but a retried
            // request's) costs no read to find it is new.
            match self
                .repo()
                .insert_reservation(&mut tx, &order_id, self.now())
                .await
            {
                Ok(()) => {}
                Err(e) if is_unique_violation(&e) => {
                    tx.rollback().await?;
                    let mut conn = self.repo().db.read().await?;
                    // Gone again (that request rolled back): try the insert once more.
                    let Some((state, lines)) =
                        self.repo().reservation(&mut conn, &order_id).await?
                    else {
                        continue;
                    };
                    if lines != wanted {
                        return Err(ServiceError::FailedPrecondition(format!(
                            "order {order_id} already has a reservation with other lines"
                        )));
                    }
                    return Ok(Self::reservation(&order_id, &state, lines));
                }
                Err(e) => return Err(e.into()),
            }
            let mut events = Vec::with_capacity(wanted.len());
            for (product_id, qty) in &wanted {
                // One statement when the units are there; the reads say why when they are not.
                let Some(after) = self.repo().take(&mut tx, product_id, *qty).await? else {
                    let product = self.repo().product(&mut tx, product_id).await?;
                    if !product.is_some_and(|p| p.active) {
                        return Err(ServiceError::not_found("product", product_id));
                    }
                    let have = self
                        .repo()
                        .stock(&mut tx, product_id)
                        .await?
                        .map(|s| s.available)
                        .unwrap_or(0);
                    return Err(ServiceError::FailedPrecondition(format!(
                        "insufficient stock for product {product_id}: {have} available, {qty} requested"
                    )));
                };
                events.push(self.stock_event(product_id, after, "reserved", &order_id));
            }
            // The lines and their events in one statement each.
            self.repo()
                .insert_reservation_lines(&mut tx, &order_id, &wanted)
                .await?;
            enqueue_all(&mut tx, &STOCK_CHANGED, &events).await?;
            tx.commit().await?;
            self.inner.relay_wake.notify_one();
            return Ok(Self::reservation(&order_id, "HELD", wanted));
        }
        Err(ServiceError::Aborted(format!(
            "reservation for order {order_id} raced; retry"
        )))
    }

    /// Moves a HELD reservation to `target`; idempotent when it is already there.
    pub(crate) async fn settle(
        &self,
        order_id: &str,
        target: &str,
    ) -> Result<Reservation, ServiceError> {
        if order_id.is_empty() {
            return Err(ServiceError::invalid("order_id", "is required"));
        }
        let mut tx = self.repo().db.begin_write().await?;
        let r = self.settle_on(&mut tx, order_id, target).await?;
        tx.commit().await?;
        self.inner.relay_wake.notify_one();
        Ok(r)
    }

    /// Moves an order's reservation to `target` (`COMMITTED` or `RELEASED`) on `conn`, inside
    /// the caller's transaction; idempotent when it is already there.
    pub async fn settle_on(
        &self,
        conn: &mut sqlx::AnyConnection,
        order_id: &str,
        target: &str,
    ) -> Result<Reservation, ServiceError> {
        let (state, lines) = self
            .repo()
            .reservation(conn, order_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("reservation", order_id))?;
        if state == target {
            return Ok(Self::reservation(order_id, &state, lines));
        }
        // For each line: (units leaving `reserved`, units returning to `available`).
        type Moves = fn(i64) -> (i64, i64);
        let (reason, moves): (&str, Moves) = match (state.as_str(), target) {
            // Paid: the units leave stock.
            ("HELD", "COMMITTED") => ("committed", |q| (q, 0)),
            // Cancelled before payment: the units return.
            ("HELD", "RELEASED") => ("released", |q| (q, q)),
            // Cancelled after payment, before shipping: the units return to the shelf.
            ("COMMITTED", "RELEASED") => ("released", |q| (0, q)),
            _ => {
                return Err(ServiceError::FailedPrecondition(format!(
                    "reservation for order {order_id} is {state}; it cannot become {target}"
                )));
            }
        };
        let mut events = Vec::with_capacity(lines.len());
        for (product_id, qty) in &lines {
            let (from_reserved, to_available) = moves(*qty);
            if let Some(after) = self
                .repo()
                .settle(conn, product_id, from_reserved, to_available)
                .await?
            {
                events.push(self.stock_event(product_id, after, reason, order_id));
            }
        }
        enqueue_all(conn, &STOCK_CHANGED, &events).await?;
        self.repo()
            .set_reservation_state(conn, order_id, target, self.now())
            .await?;
        Ok(Self::reservation(order_id, target, lines))
    }

    /// Wakes the relay after a transaction that enqueued events committed.
    pub fn wake_relay(&self) {
        self.inner.relay_wake.notify_one();
    }

    pub fn config(&self) -> &ProductsConfig {
        &self.inner.config
    }

    /// Indexes products written before search existed, 500 to a transaction; returns how
    /// many. Runs before the service serves, so a search never misses them.
    pub async fn index_catalog(&self) -> Result<u64, sqlx::Error> {
        let mut done = 0;
        loop {
            let batch = self.repo().unindexed(500).await?;
            if batch.is_empty() {
                return Ok(done);
            }
            let mut tx = self.repo().db.begin_write().await?;
            for p in &batch {
                self.repo().index_unindexed(&mut tx, p).await?;
            }
            tx.commit().await?;
            done += batch.len() as u64;
        }
    }

    pub async fn by_sku(&self, sku: &str) -> Result<Option<ProductRow>, ServiceError> {
        Ok(self.repo().product_by_sku(sku).await?)
    }
}
