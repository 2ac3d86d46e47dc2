//! The order saga end to end, in one process: products, orders, payments and delivery on
//! port-0 servers over one embedded event log, driven through their gRPC APIs. Time is a
//! test clock, so deadlines pass without sleeping.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::sync::Arc;
use std::time::Duration;

use shopverse_kit::Clock;
use shopverse_kit::testing::{PgTestDb, Spawned, as_user, channel, spawn};
use shopverse_kit::{ManualClock, Role, SystemClock};
use shopverse_proto::common::v1::{Address, Money};
use shopverse_proto::delivery::v1::delivery_service_client::DeliveryServiceClient;
use shopverse_proto::delivery::v1::{GetShipmentRequest, MarkShipmentRequest, ShipmentStatus};
use shopverse_proto::orders::v1::orders_service_client::OrdersServiceClient;
use shopverse_proto::orders::v1::*;
use shopverse_proto::payments::v1::payments_service_client::PaymentsServiceClient;
use shopverse_proto::payments::v1::{GetPaymentRequest, PaymentStatus, TransactionKind};
use shopverse_proto::products::v1::products_service_client::ProductsServiceClient;
use shopverse_proto::products::v1::{CreateProductRequest, GetStockRequest};
use shopverse_runtime::Platform;
use tonic::Code;
use tonic::transport::Channel;

type Err = Box<dyn std::error::Error + Send + Sync>;

/// Serves `S` with `config` on a port-0 listener of its own.
async fn serve_one<S: shopverse_runtime::Service>(
    platform: &Platform,
    data: &std::path::Path,
    config: S::Config,
) -> Spawned<Err> {
    let (platform, data) = (platform.clone(), data.to_owned());
    let served = spawn(|listener, stop| async move {
        shopverse_runtime::serve::<S>(listener, config, &data, platform, stop)
            .await
            .map_err(Err::from)
    });
    served.await.unwrap()
}

struct Shop {
    payments_db: String,
    /// One database per service on PostgreSQL (empty: SQLite files in `dir`).
    pg: Vec<PgTestDb>,
    dir: tempfile::TempDir,
    clock: ManualClock,
    platform: Platform,
    servers: Vec<Spawned<Err>>,
    products: ProductsServiceClient<Channel>,
    orders: OrdersServiceClient<Channel>,
    delivery: DeliveryServiceClient<Channel>,
    payments: Option<PaymentsServiceClient<Channel>>,
}

impl Shop {
    async fn start(with_payments: bool) -> Shop {
        Self::start_on(with_payments, false).await
    }

    /// With `postgres`, every service gets a fresh database on the local PostgreSQL.
    async fn start_on(with_payments: bool, postgres: bool) -> Shop {
        let mut pg = Vec::new();
        for _ in 0..if postgres { 4 } else { 0 } {
            let db = PgTestDb::create().await;
            pg.push(db.expect("PostgreSQL at 127.0.0.1:5432 (see README)"));
        }
        let url = |i: usize| {
            pg.get(i)
                .map(|d: &PgTestDb| d.url.clone())
                .unwrap_or_default()
        };
        let (products_db, orders_db, delivery_db, payments_db) = (url(0), url(1), url(2), url(3));
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(SystemClock.now_ms());
        let (platform, _log) =
            shopverse_runtime::testing::platform(dir.path(), Arc::new(clock.clone()))
                .await
                .unwrap();
        let products = serve_one::<shopverse_products::ProductsService>(
            &platform,
            dir.path(),
            shopverse_products::ProductsConfig {
                database: products_db,
                ..Default::default()
            },
        )
        .await;
        let orders = serve_one::<shopverse_orders::OrdersService>(
            &platform,
            dir.path(),
            shopverse_orders::OrdersConfig {
                database: orders_db,
                products_url: format!("http://{}", products.addr),
                sweep_interval_ms: 20,
                checkout_abandon_secs: 30,
                ..Default::default()
            },
        )
        .await;
        let delivery = serve_one::<shopverse_delivery::DeliveryService>(
            &platform,
            dir.path(),
            shopverse_delivery::DeliveryConfig {
                database: delivery_db,
                ..Default::default()
            },
        )
        .await;
        let mut shop = Shop {
            products: ProductsServiceClient::new(channel(products.addr).await.unwrap()),
            orders: OrdersServiceClient::new(channel(orders.addr).await.unwrap()),
            delivery: DeliveryServiceClient::new(channel(delivery.addr).await.unwrap()),
            payments: None,
            payments_db,
            pg,
            dir,
            clock,
            platform,
            servers: vec![products, orders, delivery],
        };
        if with_payments {
            shop.start_payments().await;
        }
        shop
    }

    async fn start_payments(&mut self) {
        let cfg = shopverse_payments::PaymentsConfig {
            database: self.payments_db.clone(),
            ..Default::default()
        };
        let payments =
            serve_one::<shopverse_payments::PaymentsService>(&self.platform, self.dir.path(), cfg)
                .await;
        let channel = channel(payments.addr).await.unwrap();
        self.payments = Some(PaymentsServiceClient::new(channel));
        self.servers.push(payments);
    }

    async fn stop(self) {
        for s in self.servers.into_iter().rev() {
            s.stop().await;
        }
        for db in self.pg {
            db.drop_db().await.expect("drop test database");
        }
    }

    async fn product(&mut self, sku: &str, cents: i64, stock: i64) -> String {
        self.products
            .create_product(as_user(
                CreateProductRequest {
                    sku: sku.into(),
                    name: format!("Product {sku}"),
                    price: Some(Money {
                        amount_minor: cents,
                        currency: "EUR".into(),
                    }),
                    initial_stock: stock,
                    ..Default::default()
                },
                "admin",
                &[Role::Admin],
            ))
            .await
            .unwrap()
            .into_inner()
            .id
    }

    async fn stock(&mut self, id: &str) -> (i64, i64) {
        let s = self
            .products
            .get_stock(GetStockRequest {
                product_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        (s.available, s.reserved)
    }

    async fn buy(
        &mut self,
        user: &str,
        product: &str,
        qty: i32,
        token: &str,
    ) -> Result<Order, tonic::Status> {
        self.orders
            .add_cart_item(who(
                user,
                AddCartItemRequest {
                    product_id: product.into(),
                    quantity: qty,
                },
            ))
            .await?;
        self.orders
            .checkout(who(
                user,
                checkout_request(token, &format!("key-{}", uuid::Uuid::new_v4())),
            ))
            .await
            .map(|r| r.into_inner())
    }

    /// Waits until `order` reaches `status` (and, when given, `paid`/`refunded` flags).
    async fn wait_for(
        &mut self,
        user: &str,
        order: &str,
        status: OrderStatus,
        check: impl Fn(&Order) -> bool,
    ) -> Order {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let o = self
                .orders
                .get_order(as_user(
                    GetOrderRequest {
                        order_id: order.into(),
                    },
                    user,
                    &[Role::Customer],
                ))
                .await
                .unwrap()
                .into_inner();
            if o.status() == status && check(&o) {
                return o;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "order stuck at {:?}: {o:?}",
                o.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn payment(&mut self, user: &str, order: &str) -> shopverse_proto::payments::v1::Payment {
        self.payments
            .as_mut()
            .unwrap()
            .get_payment(as_user(
                GetPaymentRequest {
                    order_id: order.into(),
                },
                user,
                &[Role::Customer],
            ))
            .await
            .unwrap()
            .into_inner()
    }
}

fn who<T>(user: &str, m: T) -> tonic::Request<T> {
    as_user(m, user, &[Role::Customer])
}

fn address() -> Address {
    Address {
        recipient: "Ada".into(),
        line1: "1 Main St".into(),
        city: "Berlin".into(),
        postal_code: "10115".into(),
        country: "DE".into(),
        ..Default::default()
    }
}

fn checkout_request(token: &str, key: &str) -> CheckoutRequest {
    CheckoutRequest {
        shipping_address: Some(address()),
        payment_method_token: token.into(),
        idempotency_key: key.into(),
    }
}

fn count(p: &shopverse_proto::payments::v1::Payment, kind: TransactionKind) -> usize {
    p.transactions.iter().filter(|t| t.kind() == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_to_delivered() {
    happy_path(Shop::start(true).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_to_delivered_on_postgres() {
    happy_path(Shop::start_on(true, true).await).await;
}

impl Shop {
    /// The shipment delivery schedules for `order`, once it has.
    async fn shipment(
        &mut self,
        user: &str,
        order: &str,
    ) -> shopverse_proto::delivery::v1::Shipment {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let req = GetShipmentRequest {
                order_id: order.into(),
            };
            match self.delivery.get_shipment(who(user, req)).await {
                Ok(s) => return s.into_inner(),
                Err(e) if e.code() == Code::NotFound && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// An operator marks `order`'s shipment shipped (`delivered` false) or delivered.
    async fn mark(&mut self, order: &str, delivered: bool) -> Result<(), tonic::Status> {
        let req = as_user(
            MarkShipmentRequest {
                order_id: order.into(),
            },
            "op",
            &[Role::Admin],
        );
        let marked = match delivered {
            false => self.delivery.mark_shipped(req).await,
            true => self.delivery.mark_delivered(req).await,
        };
        marked.map(|_| ())
    }
}

async fn happy_path(mut shop: Shop) {
    let p = shop.product("HAPPY", 2_500, 10).await;
    let o = shop.buy("ann", &p, 3, "pm_card_ok").await.unwrap();
    assert_eq!(o.status(), OrderStatus::PendingPayment);
    assert_eq!(o.subtotal.as_ref().unwrap().amount_minor, 7_500);
    let shipping = o.shipping.as_ref().unwrap().amount_minor;
    assert_eq!(shipping, 0, "free shipping from EUR 50");
    assert_eq!(shop.stock(&p).await, (7, 3), "reserved at checkout");
    shop.wait_for("ann", &o.id, OrderStatus::Confirmed, |o| o.paid)
        .await;
    let pay = shop.payment("ann", &o.id).await;
    let captures = count(&pay, TransactionKind::Capture);
    assert_eq!((pay.status(), captures), (PaymentStatus::Succeeded, 1));

    // Delivery schedules the shipment; an operator ships and delivers it.
    let shipment = shop.shipment("ann", &o.id).await;
    let scheduled = (shipment.carrier.as_str(), shipment.status());
    assert_eq!(scheduled, ("DHL", ShipmentStatus::Scheduled));
    let early = shop.mark(&o.id, true).await.unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "not shipped yet");
    shop.mark(&o.id, false).await.unwrap();
    shop.wait_for("ann", &o.id, OrderStatus::Shipped, |_| true)
        .await;
    let cancel = CancelOrderRequest {
        order_id: o.id.clone(),
        reason: String::new(),
    };
    let e = shop
        .orders
        .cancel_order(who("ann", cancel))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "shipped orders cannot be cancelled"
    );
    shop.mark(&o.id, true).await.unwrap();
    shop.wait_for("ann", &o.id, OrderStatus::Delivered, |_| true)
        .await;
    assert_eq!(
        shop.stock(&p).await,
        (7, 0),
        "the reservation was committed"
    );
    // Other customers do not see it.
    let theirs = GetOrderRequest {
        order_id: o.id.clone(),
    };
    let e = shop.orders.get_order(who("bob", theirs)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_flaky_and_cancel_after_payment() {
    declined_flaky_and_cancel(Shop::start(true).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_flaky_and_cancel_after_payment_on_postgres() {
    declined_flaky_and_cancel(Shop::start_on(true, true).await).await;
}

async fn declined_flaky_and_cancel(mut shop: Shop) {
    let p = shop.product("MIX", 1_000, 10).await;

    // Declined: cancelled, stock back.
    let declined = shop.buy("ann", &p, 2, "pm_card_declined").await.unwrap();
    let o = shop
        .wait_for("ann", &declined.id, OrderStatus::Cancelled, |_| true)
        .await;
    assert!(
        o.cancel_reason.contains("card declined"),
        "{}",
        o.cancel_reason
    );
    assert!(!o.paid);

    // Flaky: fails twice, then exactly one capture.
    let flaky = shop.buy("ann", &p, 1, "pm_card_flaky").await.unwrap();
    shop.wait_for("ann", &flaky.id, OrderStatus::Confirmed, |o| o.paid)
        .await;
    let pay = shop.payment("ann", &flaky.id).await;
    assert_eq!(count(&pay, TransactionKind::Capture), 1);
    assert_eq!(pay.attempts, 3);

    // Paid, then cancelled by the customer: refunded once, stock back on the shelf.
    let cancel = |id: &str| {
        as_user(
            CancelOrderRequest {
                order_id: id.into(),
                reason: "changed my mind".into(),
            },
            "ann",
            &[Role::Customer],
        )
    };
    shop.orders.cancel_order(cancel(&flaky.id)).await.unwrap();
    shop.orders
        .cancel_order(cancel(&flaky.id))
        .await
        .expect("cancelling twice is harmless");
    let o = shop
        .wait_for("ann", &flaky.id, OrderStatus::Cancelled, |o| o.refunded)
        .await;
    assert_eq!(o.cancel_reason, "changed my mind");
    let pay = shop.payment("ann", &flaky.id).await;
    assert_eq!(
        (pay.status(), count(&pay, TransactionKind::Refund)),
        (PaymentStatus::Refunded, 1)
    );
    // Stock settles asynchronously: wait for products to release both orders.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while shop.stock(&p).await != (10, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stock {:?}",
            shop.stock(&p).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_wait_for_payments_then_time_out() {
    let mut shop = Shop::start(false).await;
    let p = shop.product("WAIT", 1_000, 5).await;
    let waits = shop.buy("ann", &p, 1, "pm_card_ok").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    shop.wait_for("ann", &waits.id, OrderStatus::PendingPayment, |_| true)
        .await;

    // A second order's deadline passes while payments is still down: cancelled, stock released.
    shop.clock.advance_ms(16 * 60 * 1000);
    let late = shop.buy("ann", &p, 2, "pm_card_ok").await.unwrap();
    let o = shop
        .wait_for("ann", &waits.id, OrderStatus::Cancelled, |_| true)
        .await;
    assert_eq!(o.cancel_reason, "payment deadline passed");
    assert_eq!(
        shop.stock(&p).await.1,
        2,
        "only the fresh order holds stock"
    );

    // Payments comes back: the fresh order completes; the expired one is charged then refunded.
    shop.start_payments().await;
    shop.wait_for("ann", &late.id, OrderStatus::Confirmed, |o| o.paid)
        .await;
    let o = shop
        .wait_for("ann", &waits.id, OrderStatus::Cancelled, |o| {
            o.paid && o.refunded
        })
        .await;
    assert!(o.refunded);
    let pay = shop.payment("ann", &waits.id).await;
    assert_eq!(
        (
            count(&pay, TransactionKind::Capture),
            count(&pay, TransactionKind::Refund)
        ),
        (1, 1)
    );
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_buyers_one_unit() {
    last_unit_race(Shop::start(true).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_buyers_one_unit_on_postgres() {
    last_unit_race(Shop::start_on(true, true).await).await;
}

async fn last_unit_race(mut shop: Shop) {
    let p = shop.product("LAST", 999, 1).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut orders = shop.orders.clone();
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let user = format!("buyer-{i}");
            orders
                .add_cart_item(who(
                    &user,
                    AddCartItemRequest {
                        product_id: p,
                        quantity: 1,
                    },
                ))
                .await
                .unwrap();
            orders
                .checkout(who(
                    &user,
                    checkout_request("pm_card_ok", &format!("race-{i}-key")),
                ))
                .await
                .map(|r| (user.clone(), r.into_inner()))
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(w) => won.push(w),
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                assert!(
                    e.message().contains("insufficient stock"),
                    "{}",
                    e.message()
                );
            }
        }
    }
    assert_eq!(won.len(), 1, "exactly one buyer gets the last unit");
    let (user, order) = won.remove(0);
    shop.wait_for(&user, &order.id, OrderStatus::Confirmed, |o| o.paid)
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while shop.stock(&p).await != (0, 0) {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shop.stop().await;
}

/// `user` adds `qty` of `product` to their cart.
async fn add(shop: &mut Shop, user: &str, product: &str, qty: i32) -> Result<(), tonic::Status> {
    let line = AddCartItemRequest {
        product_id: product.into(),
        quantity: qty,
    };
    shop.orders.add_cart_item(who(user, line)).await.map(|_| ())
}

/// `user` checks out with `req`.
async fn checkout(
    shop: &mut Shop,
    user: &str,
    req: CheckoutRequest,
) -> Result<Order, tonic::Status> {
    let placed = shop.orders.checkout(who(user, req)).await;
    placed.map(tonic::Response::into_inner)
}

/// `user`'s cart.
async fn cart_of(shop: &mut Shop, user: &str) -> Cart {
    let cart = shop.orders.get_cart(who(user, GetCartRequest {})).await;
    cart.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_is_idempotent_per_key() {
    let mut shop = Shop::start(true).await;
    let p = shop.product("IDEM", 1_000, 10).await;
    let e = checkout(
        &mut shop,
        "ann",
        checkout_request("pm_card_ok", "empty-cart-key"),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::FailedPrecondition, "the cart is empty")
    );
    add(&mut shop, "ann", &p, 2).await.unwrap();
    assert_eq!(
        cart_of(&mut shop, "ann")
            .await
            .subtotal
            .unwrap()
            .amount_minor,
        2_000
    );
    let req = || checkout_request("pm_card_ok", "same-key-123");
    let first = checkout(&mut shop, "ann", req()).await.unwrap();
    let again = checkout(&mut shop, "ann", req()).await.unwrap();
    assert_eq!(first.id, again.id, "same key, same body: same order");
    let other_body = checkout_request("pm_card_declined", "same-key-123");
    let e = checkout(&mut shop, "ann", other_body).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(
        e.message().starts_with("idempotency_key:"),
        "{}",
        e.message()
    );
    assert_eq!(shop.stock(&p).await, (8, 2), "reserved once");
    assert!(cart_of(&mut shop, "ann").await.lines.is_empty());
    shop.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_its_field() {
    let mut shop = Shop::start(true).await;
    let p = shop.product("BAD", 1_000, 10).await;
    let with_address = |shipping_address: Option<Address>| CheckoutRequest {
        shipping_address,
        payment_method_token: "pm_card_ok".into(),
        idempotency_key: "k-12345678".into(),
    };
    let german = Address {
        country: "Germany".into(),
        ..address()
    };
    let list = |page_size: i32, page_token: &str| {
        let page_token = page_token.to_owned();
        who(
            "ann",
            ListMyOrdersRequest {
                page_size,
                page_token,
            },
        )
    };
    let set = SetCartItemQuantityRequest {
        product_id: p.clone(),
        quantity: -1,
    };
    let no_order = GetOrderRequest {
        order_id: String::new(),
    };
    let cases: Vec<(Result<(), tonic::Status>, &str)> = vec![
        (add(&mut shop, "ann", &p, 0).await, "quantity"),
        (add(&mut shop, "ann", &p, 100).await, "quantity"),
        (add(&mut shop, "ann", "", 1).await, "product_id"),
        (
            shop.orders
                .set_cart_item_quantity(who("ann", set))
                .await
                .map(|_| ()),
            "quantity",
        ),
        (
            checkout(&mut shop, "ann", with_address(None))
                .await
                .map(|_| ()),
            "shipping_address",
        ),
        (
            checkout(&mut shop, "ann", with_address(Some(german)))
                .await
                .map(|_| ()),
            "shipping_address.country",
        ),
        (
            checkout(&mut shop, "ann", checkout_request("pm card!", "k-12345678"))
                .await
                .map(|_| ()),
            "payment_method_token",
        ),
        (
            checkout(&mut shop, "ann", checkout_request("pm_card_ok", "short"))
                .await
                .map(|_| ()),
            "idempotency_key",
        ),
        (
            shop.orders.list_my_orders(list(1000, "")).await.map(|_| ()),
            "page_size",
        ),
        (
            shop.orders.list_my_orders(list(0, "!!")).await.map(|_| ()),
            "page_token",
        ),
        (
            shop.orders
                .get_order(who("ann", no_order))
                .await
                .map(|_| ()),
            "order_id",
        ),
    ];
    for (res, field) in cases {
        let e = res.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        let named = e.message().starts_with(&format!("{field}:"));
        assert!(named, "{field}: {}", e.message());
    }
    shop.stop().await;
}

/// An unknown product is not found; a caller without identity is unauthenticated, a customer
/// asking for the admin list is refused; the admin list filters by status, a customer's list
/// holds their own orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_identified_and_see_what_their_role_allows() {
    let mut shop = Shop::start(true).await;
    let p = shop.product("WHO", 1_000, 10).await;
    shop.buy("ann", &p, 1, "pm_card_ok").await.unwrap();
    let e = add(&mut shop, "ann", "nope", 1).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = shop.orders.get_cart(GetCartRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let all = AdminListOrdersRequest::default();
    let e = shop
        .orders
        .admin_list_orders(who("ann", all))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let pending = AdminListOrdersRequest {
        status: OrderStatus::PendingPayment.into(),
        ..Default::default()
    };
    let as_admin = as_user(pending, "op", &[Role::Admin]);
    let listed = shop
        .orders
        .admin_list_orders(as_admin)
        .await
        .unwrap()
        .into_inner();
    let all_pending = listed
        .orders
        .iter()
        .all(|o| o.status() == OrderStatus::PendingPayment);
    assert!(all_pending, "{:?}", listed.orders);
    let mine = who("ann", ListMyOrdersRequest::default());
    let mine = shop.orders.list_my_orders(mine).await.unwrap().into_inner();
    assert_eq!(mine.orders.len(), 1);
    shop.stop().await;
}

/// Adding to the cart answers with the cart as a read right after shows it: every line at
/// today's price (the one just added and the others), in the order they were added, with the
/// quantities summed and the subtotal over all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_answers_with_the_whole_cart() {
    let mut shop = Shop::start(true).await;
    let a = shop.product("ADD-A", 250, 10).await;
    let b = shop.product("ADD-B", 1_000, 10).await;
    let add = |product: &str, quantity: i32| {
        who(
            "cara",
            AddCartItemRequest {
                product_id: product.into(),
                quantity,
            },
        )
    };
    let one = shop
        .orders
        .add_cart_item(add(&a, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.lines.len(), 1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    shop.orders.add_cart_item(add(&b, 1)).await.unwrap();
    let answered = shop
        .orders
        .add_cart_item(add(&a, 2))
        .await
        .unwrap()
        .into_inner();
    let lines: Vec<(&str, i32, i64, i64)> = answered
        .lines
        .iter()
        .map(|l| {
            (
                l.product_id.as_str(),
                l.quantity,
                l.unit_price.as_ref().map_or(0, |m| m.amount_minor),
                l.line_total.as_ref().map_or(0, |m| m.amount_minor),
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![(a.as_str(), 3, 250, 750), (b.as_str(), 1, 1_000, 1_000)]
    );
    assert_eq!(
        answered.subtotal.as_ref().map(|m| m.amount_minor),
        Some(1_750)
    );
    let read = shop
        .orders
        .get_cart(who("cara", GetCartRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answered, read);
    shop.stop().await;
}

/// The cart add is one statement that checks its own limits (a line's units, a cart's lines)
/// and writes nothing when it refuses; the same SQL on SQLite and PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cart_add_keeps_its_limits_on_both_databases() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgTestDb::create()
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (see README)");
    for url in [
        format!("sqlite://{}/orders.db", dir.path().display()),
        pg.url.clone(),
    ] {
        let db = shopverse_runtime::open_db_at(&url, shopverse_orders::MIGRATIONS)
            .await
            .unwrap();
        let store = shopverse_orders::store::Store { db: db.clone() };
        let mut conn = db.pool().acquire().await.unwrap();
        let mut add = async |product: &str, qty: i64| {
            store
                .add_cart_line(&mut conn, "dora", product, qty, 1)
                .await
                .unwrap()
        };
        assert_eq!(add("p0", 60).await, Some(60), "{url}: a new line");
        assert_eq!(
            add("p0", 39).await,
            Some(99),
            "{url}: more of it, to the limit"
        );
        assert_eq!(add("p0", 1).await, None, "{url}: past the line's limit");
        assert_eq!(add("p1", 100).await, None, "{url}: a new line past it");
        for i in 1..100 {
            assert_eq!(add(&format!("p{i}"), 1).await, Some(1), "{url}: line {i}");
        }
        assert_eq!(
            add("p100", 1).await,
            None,
            "{url}: a line past the cart's limit"
        );
        assert_eq!(
            add("p1", 2).await,
            Some(3),
            "{url}: a full cart's line grows"
        );
        let lines = store.cart(&mut conn, "dora").await.unwrap();
        assert_eq!(lines.len(), 100, "{url}: nothing written by a refusal");
        assert_eq!(
            (&lines[0], &lines[1]),
            (&("p0".to_owned(), 99), &("p1".to_owned(), 3)),
            "{url}"
        );
        drop(conn);
        db.close().await;
    }
    pg.drop_db().await.unwrap();
}

/// Through the service, a refusal names what is already in the cart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cart_limit_refusal_names_what_the_cart_holds() {
    let mut shop = Shop::start(false).await;
    let p = shop.product("LIMIT", 100, 1_000).await;
    add(&mut shop, "dora", &p, 60).await.unwrap();
    let e = add(&mut shop, "dora", &p, 40).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::InvalidArgument,
            "quantity: a cart line holds at most 99 units (60 already in the cart)"
        )
    );
    let line = AddCartItemRequest {
        product_id: p.clone(),
        quantity: 39,
    };
    let cart = shop.orders.add_cart_item(who("dora", line)).await.unwrap();
    assert_eq!(cart.into_inner().lines[0].quantity, 99);
    shop.stop().await;
}

/// An admin's request to create `sku` at `amount_minor` in `currency`, 1,000 in stock.
fn create(sku: &str, amount_minor: i64, currency: &str) -> tonic::Request<CreateProductRequest> {
    let price = Money {
        amount_minor,
        currency: currency.into(),
    };
    let product = CreateProductRequest {
        sku: sku.into(),
        name: format!("Product {sku}"),
        price: Some(price),
        initial_stock: 1_000,
        ..Default::default()
    };
    as_user(product, "admin", &[Role::Admin])
}

/// The overflow a new user found: a price near i64's end times 99 wrapped to a negative total
/// that was charged and confirmed. Prices are bounded, and so are currencies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_out_of_bounds_are_refused() {
    let mut shop = Shop::start(false).await;
    for (sku, amount, currency) in [
        ("HUGE", 900_000_000_000_000_000, "EUR"),
        ("OVER", 100_000_000_001, "EUR"),
        ("NEG", -1, "EUR"),
        ("CUR", 100, "EUX"),
        ("LOW", 100, "eur"),
    ] {
        let e = shop
            .products
            .create_product(create(sku, amount, currency))
            .await;
        let code = e.map_err(|e| e.code()).err();
        assert_eq!(code, Some(Code::InvalidArgument), "{sku}");
    }
    shop.stop().await;
}

/// Ten lines of 99 at the highest price: exact to the unit in the cart, the order and the
/// provider's capture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cart_at_the_top_price_is_exact_to_the_capture() {
    let mut shop = Shop::start(true).await;
    const MAX: i64 = 100_000_000_000;
    for i in 0..10 {
        let id = shop.product(&format!("MAX{i}"), MAX, 1_000).await;
        add(&mut shop, "midas", &id, 99).await.unwrap();
    }
    let cart = cart_of(&mut shop, "midas").await;
    let want = 10 * 99 * MAX;
    assert_eq!(cart.subtotal.as_ref().map(|m| m.amount_minor), Some(want));
    let line_total = |l: &CartLine| l.line_total.as_ref().map(|m| m.amount_minor);
    assert!(cart.lines.iter().all(|l| line_total(l) == Some(99 * MAX)));

    let req = checkout_request("pm_card_ok", "midas-checkout-1");
    let order = checkout(&mut shop, "midas", req).await.unwrap();
    assert_eq!(order.total.as_ref().map(|m| m.amount_minor), Some(want));
    shop.wait_for("midas", &order.id, OrderStatus::Confirmed, |o| o.paid)
        .await;
    let payment = shop.payment("midas", &order.id).await;
    let captured: Vec<i64> = payment
        .transactions
        .iter()
        .filter(|t| t.kind() == TransactionKind::Capture)
        .filter_map(|t| t.amount.as_ref().map(|m| m.amount_minor))
        .collect();
    assert_eq!(captured, [want]);
    shop.stop().await;
}

/// A yen product does not join a euro cart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cart_keeps_one_currency() {
    let mut shop = Shop::start(false).await;
    let euro = shop.product("EURO", 100, 10).await;
    add(&mut shop, "midas", &euro, 1).await.unwrap();
    let yen = shop
        .products
        .create_product(create("YEN", 500, "JPY"))
        .await;
    let yen = yen.unwrap().into_inner().id;
    let e = add(&mut shop, "midas", &yen, 1).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::FailedPrecondition,
            "the cart holds EUR items; a JPY item cannot join them"
        )
    );
    shop.stop().await;
}

/// Records of `topic` about `key` with event type `kind`, from every partition.
async fn records_of(
    platform: &Platform,
    topic: &str,
    key: &str,
    kind: &str,
) -> Vec<shopverse_events::Record> {
    let bus = platform.bus.as_ref();
    let mut out = Vec::new();
    for p in 0..bus.partitions(topic).await.unwrap() {
        let mut from = 0;
        loop {
            let got = bus.fetch(topic, p, from, 500).await.unwrap();
            let Some(last) = got.last() else { break };
            from = last.offset + 1;
            out.extend(
                got.into_iter()
                    .filter(|r| r.key == key && r.header("event-type") == Some(kind)),
            );
        }
    }
    out
}

/// At least `n` records of `topic` about `key` of type `kind`, within 20 s.
async fn until_records(
    platform: &Platform,
    (topic, key, kind): (&str, &str, &str),
    n: usize,
) -> Vec<shopverse_events::Record> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = records_of(platform, topic, key, kind).await;
        if r.len() >= n {
            return r;
        }
        let late = tokio::time::Instant::now() >= deadline;
        assert!(!late, "{} of {n} {kind} records about {key}", r.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The orders database forgets it handled `paid` for `order` (as a restore of an older snapshot,
/// or a lost inbox row, would): the order back to waiting for payment, the inbox row and the
/// outbox rows gone.
async fn orders_forget_the_payment(shop: &Shop, order: &str, paid: &shopverse_events::Record) {
    shopverse_storage::install_drivers();
    let url = format!("sqlite://{}/orders.db", shop.dir.path().display());
    let db = shopverse_storage::Db::connect(&url, 1).await.unwrap();
    let mut tx = db.begin_write().await.unwrap();
    for (sql, bind) in [
        (
            "UPDATE orders SET status = 'PENDING_PAYMENT', paid = 0 WHERE id = $1",
            order,
        ),
        (
            "DELETE FROM inbox WHERE consumer = 'orders' AND event_id = $1",
            paid.header("event-id").unwrap(),
        ),
        ("DELETE FROM outbox WHERE event_key = $1", order),
    ] {
        let done = sqlx::query(sql).bind(bind).execute(&mut *tx).await;
        assert!(done.unwrap().rows_affected() >= 1, "{sql} changed nothing");
    }
    tx.commit().await.unwrap();
    db.close().await;
}

/// Until `group` has committed past `record`.
async fn until_read(platform: &Platform, group: &str, record: &shopverse_events::Record) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let bus = platform.bus.as_ref();
    while bus
        .committed(group, &record.topic, record.partition)
        .await
        .unwrap()
        <= record.offset
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{group} never read it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The orders database loses what handling `payment.succeeded` did, and the event is delivered
/// again: orders confirms the order again and raises `order.confirmed` with the same id as the
/// first time, so downstream (delivery) drops the copy and schedules one shipment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cause_handled_twice_raises_the_same_event() {
    let mut shop = Shop::start(true).await;
    let p = shop.product("TWICE", 1_000, 5).await;
    let o = shop.buy("ann", &p, 1, "pm_card_ok").await.unwrap();
    shop.wait_for("ann", &o.id, OrderStatus::Confirmed, |o| o.paid)
        .await;
    let paid = ("shopverse.payments", o.id.as_str(), "payment.succeeded");
    let confirmed = ("shopverse.orders", o.id.as_str(), "order.confirmed");
    let paid = until_records(&shop.platform, paid, 1).await;
    assert_eq!(paid.len(), 1);
    let first = until_records(&shop.platform, confirmed, 1).await;
    let first_id = first[0].header("event-id").unwrap().to_owned();

    orders_forget_the_payment(&shop, &o.id, &paid[0]).await;
    let again = shopverse_events::OutRecord {
        topic: paid[0].topic.clone(),
        key: paid[0].key.clone(),
        headers: paid[0].headers.clone(),
        payload: paid[0].payload.clone(),
    };
    shop.platform.bus.publish(&[again]).await.unwrap();
    let both = until_records(&shop.platform, confirmed, 2).await;
    assert_eq!(both.len(), 2);
    for r in &both {
        assert_eq!(r.header("event-id"), Some(first_id.as_str()));
    }
    // Delivery has read both copies once its offset is past the second: one shipment event.
    until_read(&shop.platform, "delivery", &both[1]).await;
    let scheduled = records_of(
        &shop.platform,
        "shopverse.delivery",
        &o.id,
        "shipment.scheduled",
    );
    assert_eq!(scheduled.await.len(), 1, "one shipment event for one order");
    shop.stop().await;
}
