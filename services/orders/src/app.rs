//! The gRPC service `shopverse.orders.v1.OrdersService`, and the order state machine that the
//! saga consumer and the sweeper share.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use shopverse_rpc::Link;
use tokio::sync::Notify;
use tonic::{Code, Status};

use shopverse_events::envelope::{
    EventType, ORDER_CANCELLED, ORDER_CONFIRMED, ORDER_DELIVERED, ORDER_PLACED, ORDER_SHIPPED,
    Origin, new_envelope,
};
use shopverse_events::outbox::enqueue;
use shopverse_kit::clock::to_timestamp;
use shopverse_kit::identity::Identity;
use shopverse_kit::validate::{address, address_to_json, text};
use shopverse_kit::{Clock, ServiceError};
use shopverse_proto::common::v1::Money;
use shopverse_proto::orders::v1::orders_service_server::OrdersServiceServer;
use shopverse_proto::orders::v1::*;
use shopverse_proto::products::v1::products_service_client::ProductsServiceClient;
use shopverse_proto::products::v1::{
    GetProductRequest, ReservationLine, ReservationState, ReserveStockRequest,
};
use shopverse_runtime::Platform;
use shopverse_storage::Db;
use shopverse_storage::is_unique_violation;

use crate::config::OrdersConfig;
use crate::domain::{CheckoutState, MAX_CART_LINES, MAX_LINE_QUANTITY, OrderState};
use crate::store::{CheckoutRow, LineRow, OrderRow, Store};

const SOURCE: &str = "orders";

pub(crate) fn proto_money(m: shopverse_money::Money) -> Money {
    Money {
        amount_minor: m.amount_minor(),
        currency: m.currency().code().to_owned(),
    }
}

pub(crate) fn money(amount_minor: i64, currency: &str) -> Option<Money> {
    Some(Money {
        amount_minor,
        currency: currency.to_owned(),
    })
}

pub fn order_to_proto(o: &OrderRow) -> Order {
    Order {
        id: o.id.clone(),
        user_id: o.user_id.clone(),
        status: o.status.to_proto().into(),
        lines: o
            .lines
            .iter()
            .map(|l| OrderLine {
                product_id: l.product_id.clone(),
                sku: l.sku.clone(),
                name: l.name.clone(),
                unit_price: money(l.unit_price_minor, &o.currency),
                quantity: i32::try_from(l.quantity).unwrap_or(i32::MAX),
                // Checked when the order was placed; saturating only guards a row edited by hand.
                line_total: money(l.unit_price_minor.saturating_mul(l.quantity), &o.currency),
            })
            .collect(),
        subtotal: money(o.subtotal_minor, &o.currency),
        shipping: money(o.shipping_minor, &o.currency),
        total: money(o.total_minor, &o.currency),
        shipping_address: Some(o.shipping_address.clone()),
        payment_method_token: o.payment_method_token.clone(),
        created_at: Some(to_timestamp(o.created_at)),
        updated_at: Some(to_timestamp(o.updated_at)),
        payment_deadline: Some(to_timestamp(o.payment_deadline)),
        cancel_reason: o.cancel_reason.clone(),
        paid: o.paid,
        refunded: o.refunded,
    }
}

/// A product as the cart and checkout see it.
pub(crate) struct Priced {
    sku: String,
    name: String,
    price: Money,
}

pub(crate) struct Inner {
    store: Store,
    products: ProductsServiceClient<Link>,
    pub(crate) config: OrdersConfig,
    pub(crate) clock: Arc<dyn Clock>,
    relay_wake: Arc<Notify>,
}

#[derive(Clone)]
pub struct Orders {
    inner: Arc<Inner>,
}

pub(crate) fn upstream(e: Status) -> ServiceError {
    ServiceError::Unavailable(format!(
        "the products service did not answer: {}",
        e.message()
    ))
}

impl Orders {
    pub fn new(
        db: Db,
        products: impl Into<Link>,
        config: OrdersConfig,
        platform: &Platform,
        relay_wake: Arc<Notify>,
    ) -> Orders {
        Orders {
            inner: Arc::new(Inner {
                store: Store { db },
                products: ProductsServiceClient::new(products.into()),
                config,
                clock: platform.clock.clone(),
                relay_wake,
            }),
        }
    }

    pub fn into_server(self) -> OrdersServiceServer<Orders> {
        OrdersServiceServer::new(self)
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &OrdersConfig {
        &self.inner.config
    }

    pub fn now(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    pub fn wake_relay(&self) {
        self.inner.relay_wake.notify_one();
    }

    pub fn products(&self) -> ProductsServiceClient<Link> {
        self.inner.products.clone()
    }

    /// The product now; `None` when it is gone or archived.
    pub(crate) async fn priced(&self, product_id: &str) -> Result<Option<Priced>, ServiceError> {
        match self
            .products()
            .get_product(GetProductRequest {
                id: product_id.to_owned(),
            })
            .await
        {
            Ok(r) => {
                let p = r.into_inner();
                Ok(p.price.map(|price| Priced {
                    sku: p.sku,
                    name: p.name,
                    price,
                }))
            }
            Err(e) if e.code() == Code::NotFound => Ok(None),
            Err(e) => Err(upstream(e)),
        }
    }

    pub async fn cart(&self, user_id: &str) -> Result<Cart, ServiceError> {
        let mut conn = self.store().db.read().await?;
        let lines = self.store().cart(&mut conn, user_id).await?;
        drop(conn);
        self.priced_cart(lines, None).await
    }

    /// The cart of `lines` at today's prices; `known` is one product already priced for this
    /// answer (the one just added), not asked for again.
    pub(crate) async fn priced_cart(
        &self,
        lines: Vec<(String, i64)>,
        mut known: Option<(&str, Priced)>,
    ) -> Result<Cart, ServiceError> {
        let mut out = Cart::default();
        // `None` once the lines disagree in currency (a cart from before carts refused that) or
        // the sum does not fit: no subtotal is shown rather than a wrong one.
        let mut subtotal: Option<Result<shopverse_money::Money, shopverse_money::MoneyError>> =
            None;
        for (product_id, qty) in lines {
            let quantity = i32::try_from(qty).unwrap_or(0);
            let priced = match known.take_if(|(id, _)| *id == product_id) {
                Some((_, p)) => Some(p),
                None => self.priced(&product_id).await?,
            };
            match priced {
                Some(p) => {
                    let line =
                        shopverse_money::Money::parse(p.price.amount_minor, &p.price.currency)
                            .and_then(|price| price.checked_mul(qty));
                    subtotal = Some(match (subtotal, line.clone()) {
                        (None, line) => line,
                        (Some(s), Ok(line)) => s.and_then(|s| s.checked_add(line)),
                        (Some(_), Err(e)) => Err(e),
                    });
                    out.lines.push(CartLine {
                        product_id,
                        sku: p.sku,
                        name: p.name,
                        line_total: line.ok().map(proto_money),
                        unit_price: Some(p.price),
                        quantity,
                        available: true,
                    });
                }
                None => out.lines.push(CartLine {
                    product_id,
                    quantity,
                    available: false,
                    ..Default::default()
                }),
            }
        }
        out.subtotal = subtotal.and_then(Result::ok).map(proto_money);
        Ok(out)
    }

    /// A cart holds one currency: a product priced in another is refused, naming both.
    pub(crate) async fn check_one_currency(
        &self,
        user_id: &str,
        product_id: &str,
        currency: &str,
    ) -> Result<(), ServiceError> {
        let mut conn = self.store().db.read().await?;
        let lines = self.store().cart(&mut conn, user_id).await?;
        drop(conn);
        // Every line was checked against the others when it was added: one is enough.
        for (other, _) in lines.iter().filter(|(id, _)| id != product_id) {
            if let Some(p) = self.priced(other).await? {
                if p.price.currency != currency {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "the cart holds {} items; a {currency} item cannot join them",
                        p.price.currency
                    )));
                }
                return Ok(());
            }
        }
        Ok(())
    }

    pub(crate) fn check_quantity(q: i32) -> Result<i64, ServiceError> {
        let q = i64::from(q);
        if !(1..=MAX_LINE_QUANTITY).contains(&q) {
            return Err(ServiceError::invalid(
                "quantity",
                format!("must be between 1 and {MAX_LINE_QUANTITY}"),
            ));
        }
        Ok(q)
    }

    pub async fn add_item(
        &self,
        user_id: &str,
        product_id: &str,
        quantity: i32,
    ) -> Result<Cart, ServiceError> {
        let qty = Self::check_quantity(quantity)?;
        if product_id.is_empty() {
            return Err(ServiceError::invalid("product_id", "is required"));
        }
        let Some(priced) = self.priced(product_id).await? else {
            return Err(ServiceError::not_found("product", product_id));
        };
        self.check_one_currency(user_id, product_id, &priced.price.currency)
            .await?;
        // One statement under the writer turn (it checks the limits itself): a read-then-write
        // transaction held the orders file's turn across four hand-offs to SQLite's thread,
        // and every cart, checkout and saga step of the shop queues on that turn.
        let added = {
            let mut conn = self.store().db.write_conn().await?;
            self.store()
                .add_cart_line(&mut conn, user_id, product_id, qty, self.now())
                .await?
        };
        let mut conn = self.store().db.read().await?;
        let lines = self.store().cart(&mut conn, user_id).await?;
        drop(conn);
        if added.is_none() {
            let current = lines
                .iter()
                .find(|(id, _)| id == product_id)
                .map(|(_, q)| *q);
            return Err(match current {
                Some(current) => ServiceError::invalid(
                    "quantity",
                    format!(
                        "a cart line holds at most {MAX_LINE_QUANTITY} units ({current} already in the cart)"
                    ),
                ),
                None => ServiceError::FailedPrecondition(format!(
                    "a cart holds at most {MAX_CART_LINES} lines"
                )),
            });
        }
        self.priced_cart(lines, Some((product_id, priced))).await
    }

    pub async fn set_quantity(
        &self,
        user_id: &str,
        product_id: &str,
        quantity: i32,
    ) -> Result<Cart, ServiceError> {
        let qty = Self::check_quantity(quantity)?;
        let mut tx = self.store().db.begin_write().await?;
        if self
            .store()
            .cart_quantity(&mut tx, user_id, product_id)
            .await?
            .is_none()
        {
            return Err(ServiceError::not_found("cart line for product", product_id));
        }
        self.store()
            .set_cart_line(&mut tx, user_id, product_id, qty, self.now())
            .await?;
        tx.commit().await?;
        self.cart(user_id).await
    }

    pub async fn remove_item(&self, user_id: &str, product_id: &str) -> Result<Cart, ServiceError> {
        if product_id.is_empty() {
            return Err(ServiceError::invalid("product_id", "is required"));
        }
        let mut conn = self.store().db.write_conn().await?;
        if self
            .store()
            .remove_cart_lines(&mut conn, user_id, &[product_id])
            .await?
            == 0
        {
            return Err(ServiceError::not_found("cart line for product", product_id));
        }
        drop(conn);
        self.cart(user_id).await
    }

    pub async fn clear(&self, user_id: &str) -> Result<Cart, ServiceError> {
        let mut conn = self.store().db.write_conn().await?;
        self.store().clear_cart(&mut conn, user_id).await?;
        Ok(Cart::default())
    }

    /// Finds the checkout attempt for `key`, or starts one from the current cart.
    pub(crate) async fn attempt(
        &self,
        user_id: &str,
        key: &str,
        hash: &str,
    ) -> Result<CheckoutRow, ServiceError> {
        for _ in 0..3 {
            // The reads need no writer turn: two requests with one key that both find no
            // attempt race on the insert, and the loser reads the winner's row.
            let mut conn = self.store().db.read().await?;
            if let Some(c) = self.store().checkout(&mut conn, user_id, key).await? {
                if c.request_hash != hash {
                    return Err(ServiceError::AlreadyExists(
                        "idempotency_key: already used for a different checkout request".into(),
                    ));
                }
                return Ok(c);
            }
            let lines = self.store().cart(&mut conn, user_id).await?;
            if lines.is_empty() {
                return Err(ServiceError::FailedPrecondition("the cart is empty".into()));
            }
            let attempt = CheckoutRow {
                request_hash: hash.to_owned(),
                order_id: uuid::Uuid::now_v7().to_string(),
                state: CheckoutState::Reserving,
                lines,
                error: None,
            };
            drop(conn);
            let mut conn = self.store().db.write_conn().await?;
            let inserted = self
                .store()
                .insert_checkout(&mut conn, user_id, key, &attempt, self.now())
                .await;
            drop(conn);
            match inserted {
                Ok(()) => return Ok(attempt),
                // The same key, concurrently: read what the other request wrote.
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Aborted(
            "concurrent checkouts with one idempotency key; retry".into(),
        ))
    }

    pub(crate) async fn refuse(
        &self,
        order_id: &str,
        message: String,
    ) -> Result<OrderRow, ServiceError> {
        let mut conn = self.store().db.write_conn().await?;
        self.store()
            .move_checkout(
                &mut conn,
                order_id,
                CheckoutState::Reserving,
                CheckoutState::Failed,
                Some(&message),
                self.now(),
            )
            .await?;
        Err(ServiceError::FailedPrecondition(message))
    }

    /// Checkout. See the crate docs for how it stays correct across crashes and retries.
    pub async fn checkout(
        &self,
        user_id: &str,
        req: CheckoutRequest,
        traceparent: Option<&str>,
    ) -> Result<OrderRow, ServiceError> {
        let shipping = req
            .shipping_address
            .as_ref()
            .ok_or_else(|| ServiceError::invalid("shipping_address", "is required"))?;
        let shipping = address("shipping_address", shipping)?;
        let token = text("payment_method_token", &req.payment_method_token, 100, true)?;
        if !token.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ServiceError::invalid(
                "payment_method_token",
                "may hold letters, digits and _ only",
            ));
        }
        let key = text("idempotency_key", &req.idempotency_key, 100, true)?;
        if key.chars().count() < 8 {
            return Err(ServiceError::invalid(
                "idempotency_key",
                "must be at least 8 characters",
            ));
        }
        let hash: String = Sha256::digest(format!("{}\n{token}", address_to_json(&shipping)))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();

        let attempt = self.attempt(user_id, &key, &hash).await?;
        let order_id = attempt.order_id.clone();
        match attempt.state {
            CheckoutState::Reserving => {}
            CheckoutState::Placed => return self.order_of(&order_id).await,
            CheckoutState::Failed => {
                return Err(ServiceError::FailedPrecondition(
                    attempt.error.unwrap_or_else(|| "checkout failed".into()),
                ));
            }
            CheckoutState::Abandoning | CheckoutState::Abandoned => {
                return Err(ServiceError::Aborted(
                    "this checkout was interrupted and given up; retry with a new idempotency key"
                        .into(),
                ));
            }
        }

        // Price every line now; the order keeps these prices. The totals are checked here,
        // before any stock is held: a total that does not fit, mixes currencies or is not
        // positive refuses the checkout.
        let mut lines = Vec::with_capacity(attempt.lines.len());
        let mut subtotal: Option<shopverse_money::Money> = None;
        for (product_id, qty) in &attempt.lines {
            let Some(p) = self.priced(product_id).await? else {
                return self
                    .refuse(
                        &order_id,
                        format!(
                            "product {product_id} is no longer available; remove it from the cart"
                        ),
                    )
                    .await;
            };
            let line_total = shopverse_money::Money::parse(p.price.amount_minor, &p.price.currency)
                .and_then(|price| price.checked_mul(*qty));
            let sum = match (subtotal, line_total) {
                (_, Err(e)) => Err(e),
                (None, Ok(line)) => Ok(line),
                (Some(s), Ok(line)) => s.checked_add(line),
            };
            subtotal = match sum {
                Ok(s) => Some(s),
                Err(shopverse_money::MoneyError::CurrencyMismatch(..)) => {
                    return self
                        .refuse(
                            &order_id,
                            "the cart mixes currencies; check out one currency at a time".into(),
                        )
                        .await;
                }
                Err(e) => {
                    return self
                        .refuse(&order_id, format!("the order total cannot be made: {e}"))
                        .await;
                }
            };
            lines.push(LineRow {
                product_id: product_id.clone(),
                sku: p.sku,
                name: p.name,
                unit_price_minor: p.price.amount_minor,
                quantity: *qty,
            });
        }
        let Some(subtotal) = subtotal else {
            return self.refuse(&order_id, "the cart is empty".into()).await;
        };
        let shipping_fee = shopverse_money::Money::new(
            if subtotal.amount_minor() >= self.config().free_shipping_from_minor {
                0
            } else {
                self.config().shipping_fee_minor
            },
            subtotal.currency(),
        );
        let total = match subtotal.checked_add(shipping_fee) {
            Ok(t) if t.is_positive() => t,
            Ok(_) => {
                return self
                    .refuse(&order_id, "the order total must be positive".into())
                    .await;
            }
            Err(e) => {
                return self
                    .refuse(&order_id, format!("the order total cannot be made: {e}"))
                    .await;
            }
        };

        // Reserve all lines or none; idempotent per order id, so a retry after a crash is safe.
        let reservation = self
            .products()
            .reserve_stock(ReserveStockRequest {
                order_id: order_id.clone(),
                lines: lines
                    .iter()
                    .map(|l| ReservationLine {
                        product_id: l.product_id.clone(),
                        quantity: l.quantity,
                    })
                    .collect(),
            })
            .await;
        match reservation {
            Ok(r) if r.get_ref().state() == ReservationState::Held => {
                shopverse_kit::crash::point("orders.after_reserve", "");
            }
            Ok(_) => {
                return Err(ServiceError::Aborted(
                    "this checkout was interrupted and given up; retry with a new idempotency key"
                        .into(),
                ));
            }
            Err(e)
                if matches!(
                    e.code(),
                    Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument
                ) =>
            {
                return self.refuse(&order_id, e.message().to_owned()).await;
            }
            Err(e) => return Err(upstream(e)),
        }

        let now = self.now();
        let order = OrderRow {
            id: order_id.clone(),
            user_id: user_id.to_owned(),
            status: OrderState::PendingPayment,
            currency: total.currency().code().to_owned(),
            subtotal_minor: subtotal.amount_minor(),
            shipping_minor: shipping_fee.amount_minor(),
            total_minor: total.amount_minor(),
            shipping_address: shipping,
            payment_method_token: token,
            paid: false,
            refunded: false,
            cancel_reason: String::new(),
            payment_deadline: now + self.config().payment_deadline_secs * 1000,
            created_at: now,
            updated_at: now,
            lines,
        };
        let mut tx = self.store().db.begin_write().await?;
        if !self
            .store()
            .move_checkout(
                &mut tx,
                &order_id,
                CheckoutState::Reserving,
                CheckoutState::Placed,
                None,
                now,
            )
            .await?
        {
            // Another request with the same key placed it, or the sweeper gave it up.
            tx.rollback().await?;
            let mut conn = self.store().db.read().await?;
            return match self.store().checkout(&mut conn, user_id, &key).await? {
                Some(c) if c.state == CheckoutState::Placed => self.order_of(&order_id).await,
                _ => Err(ServiceError::Aborted(
                    "this checkout was interrupted and given up; retry with a new idempotency key"
                        .into(),
                )),
            };
        }
        self.store().insert_order(&mut tx, &order).await?;
        let bought: Vec<&str> = order.lines.iter().map(|l| l.product_id.as_str()).collect();
        self.store()
            .remove_cart_lines(&mut tx, user_id, &bought)
            .await?;
        // Keyed by the order, which the checkout's idempotency key names: a retried checkout
        // that gets this far raises the same event.
        let origin = Origin::Keyed {
            key: &order.id,
            traceparent,
        };
        self.emit(&mut tx, &ORDER_PLACED, &order, origin).await?;
        shopverse_kit::crash::point("orders.before_order_commit", "");
        tx.commit().await?;
        self.wake_relay();
        Ok(order)
    }

    pub(crate) async fn order_of(&self, order_id: &str) -> Result<OrderRow, ServiceError> {
        let mut conn = self.store().db.read().await?;
        self.store()
            .order(&mut conn, order_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("order", order_id))
    }

    /// Writes `kind` for `order` to the outbox on `conn`; `origin` gives its id and trace.
    pub async fn emit(
        &self,
        conn: &mut sqlx::AnyConnection,
        kind: &EventType,
        order: &OrderRow,
        origin: Origin<'_>,
    ) -> Result<(), sqlx::Error> {
        let env = if kind.name == ORDER_CANCELLED.name {
            let payload = OrderCancelled {
                order: Some(order_to_proto(order)),
                reason: order.cancel_reason.clone(),
                was_paid: order.paid,
            };
            new_envelope(kind, SOURCE, &order.id, self.now(), origin, &payload)
        } else {
            let payload = OrderEvent {
                order: Some(order_to_proto(order)),
            };
            new_envelope(kind, SOURCE, &order.id, self.now(), origin, &payload)
        };
        enqueue(conn, kind, &env).await
    }

    /// Moves `order` to `to` on `conn` (in the caller's transaction) and emits the matching
    /// event, its id from `origin`. `Ok(false)` when the state machine does not allow it or the
    /// order moved meanwhile.
    pub async fn transition(
        &self,
        conn: &mut sqlx::AnyConnection,
        order: &mut OrderRow,
        to: OrderState,
        reason: &str,
        origin: Origin<'_>,
    ) -> Result<bool, sqlx::Error> {
        if !order.status.can_become(to) {
            return Ok(false);
        }
        let from = std::mem::replace(&mut order.status, to);
        match to {
            OrderState::Confirmed => order.paid = true,
            OrderState::Cancelled => order.cancel_reason = reason.to_owned(),
            _ => {}
        }
        order.updated_at = self.now();
        if !self.store().update_order(conn, order, from).await? {
            return Ok(false);
        }
        let kind = match to {
            OrderState::Confirmed => &ORDER_CONFIRMED,
            OrderState::Shipped => &ORDER_SHIPPED,
            OrderState::Delivered => &ORDER_DELIVERED,
            OrderState::PendingPayment | OrderState::Cancelled => &ORDER_CANCELLED,
        };
        self.emit(conn, kind, order, origin).await?;
        Ok(true)
    }

    /// The owner's (or an admin's) view of an order; anyone else is told it does not exist.
    pub(crate) async fn visible(
        &self,
        caller: &Identity,
        order_id: &str,
    ) -> Result<OrderRow, ServiceError> {
        if order_id.is_empty() {
            return Err(ServiceError::invalid("order_id", "is required"));
        }
        match self.order_of(order_id).await {
            Ok(o) if o.user_id == caller.user_id || caller.is_admin() => Ok(o),
            Ok(_) | Err(ServiceError::NotFound { .. }) => {
                Err(ServiceError::not_found("order", order_id))
            }
            Err(e) => Err(e),
        }
    }

    pub async fn cancel(
        &self,
        caller: &Identity,
        order_id: &str,
        reason: &str,
    ) -> Result<OrderRow, ServiceError> {
        let reason = text("reason", reason, 200, false)?;
        self.visible(caller, order_id).await?;
        let mut tx = self.store().db.begin_write().await?;
        let mut order = self
            .store()
            .order(&mut tx, order_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("order", order_id))?;
        if order.status == OrderState::Cancelled {
            return Ok(order);
        }
        let why = if reason.is_empty() {
            "cancelled by the customer".to_owned()
        } else {
            reason
        };
        if !self
            .transition(
                &mut tx,
                &mut order,
                OrderState::Cancelled,
                &why,
                Origin::Keyed {
                    key: order_id,
                    traceparent: None,
                },
            )
            .await?
        {
            return Err(ServiceError::FailedPrecondition(format!(
                "order {order_id} is {}; only unshipped orders can be cancelled",
                order.status.as_str().to_lowercase()
            )));
        }
        tx.commit().await?;
        self.wake_relay();
        Ok(order)
    }

    pub(crate) async fn list(
        &self,
        user: Option<&str>,
        status: Option<OrderState>,
        page_size: i32,
        token: &str,
    ) -> Result<ListOrdersResponse, ServiceError> {
        let page = shopverse_kit::paging::Page::parse(page_size, token, 20, 100)?;
        let mut rows = self
            .store()
            .list(user, status, &page.cursor, page.fetch())
            .await?;
        let next_page_token = page.finish(&mut rows, |o| &o.id);
        Ok(ListOrdersResponse {
            next_page_token,
            orders: rows.iter().map(order_to_proto).collect(),
        })
    }
}
