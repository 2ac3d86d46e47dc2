//! The products service over gRPC on a port-0 server, on SQLite and on PostgreSQL.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use shopverse_events::EventBus;
use shopverse_events::embedded::EmbeddedLog;
use shopverse_kit::testing::{PgTestDb, as_user};
use shopverse_kit::{Role, SystemClock};
use shopverse_products::ProductsConfig;
use shopverse_proto::products::v1::products_service_client::ProductsServiceClient;
use shopverse_proto::products::v1::*;
use tonic::Code;
use tonic::transport::Channel;

mod common;
use common::*;

/// A catalog: Electronics > Audio and Books; headphones in Audio, a television in Electronics,
/// a book about headphones in Books.
struct Catalog {
    electronics: String,
    headphones: Product,
}

async fn fill(c: &mut ProductsServiceClient<Channel>) -> Catalog {
    let electronics = category(c, "Electronics", "").await;
    let audio = category(c, "Audio", &electronics).await;
    let books = category(c, "Books", "").await;
    let cats = c.list_categories(ListCategoriesRequest {}).await;
    let cats = cats.expect("categories").into_inner().categories;
    let slugs: Vec<&str> = cats.iter().map(|c| c.slug.as_str()).collect();
    assert_eq!(
        slugs,
        ["books", "electronics", "audio"],
        "parents before children"
    );
    let again = CreateCategoryRequest {
        name: "Audio".into(),
        ..Default::default()
    };
    let e = c.create_category(admin(again)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    let headphones = create(
        c,
        new_product("HP-1", "Studio Headphones", 9_999, &audio, 5),
    )
    .await;
    assert_eq!(headphones.version, 1);
    create(
        c,
        new_product("TV-1", "Television", 49_900, &electronics, 2),
    )
    .await;
    create(
        c,
        new_product("BK-1", "A Book About Headphones", 1_999, &books, 50),
    )
    .await;
    Catalog {
        electronics,
        headphones,
    }
}

/// Bad input, each with its own code.
async fn bad_input_is_refused(c: &mut ProductsServiceClient<Channel>) {
    let mut refused =
        async |req: tonic::Request<CreateProductRequest>| c.create_product(req).await.unwrap_err();
    let e = refused(admin(new_product("HP-1", "Dup", 1, "", 0))).await;
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = refused(admin(new_product("bad sku!", "X", 1, "", 0))).await;
    assert_eq!(
        (e.code(), e.message().starts_with("sku:")),
        (Code::InvalidArgument, true)
    );
    let e = refused(admin(new_product("NEG", "X", -5, "", 0))).await;
    assert!(
        e.message().starts_with("price.amount_minor:"),
        "{}",
        e.message()
    );
    let e = refused(tonic::Request::new(new_product("ANON", "X", 1, "", 0))).await;
    assert_eq!(e.code(), Code::Unauthenticated);
    let customer = as_user(new_product("CUST", "X", 1, "", 0), "u", &[Role::Customer]);
    assert_eq!(refused(customer).await.code(), Code::PermissionDenied);
    let e = c.get_product(GetProductRequest { id: "nope".into() }).await;
    assert_eq!(e.unwrap_err().code(), Code::NotFound);
}

/// Browsing: a category with its subcategories, text, sort, by SKU; a wildcard is a literal.
async fn browsing_finds_what_it_should(c: &mut ProductsServiceClient<Channel>, cat: &Catalog) {
    let electronics = ListProductsRequest {
        category_id: cat.electronics.clone(),
        ..Default::default()
    };
    assert_eq!(
        list_all(c, electronics).await.len(),
        2,
        "Audio is under Electronics"
    );
    let headphones = ListProductsRequest {
        query: "HEADPHONES".into(),
        sort: ProductSort::PriceAsc.into(),
        ..Default::default()
    };
    let found = list_all(c, headphones).await;
    let skus: Vec<&str> = found.iter().map(|p| p.sku.as_str()).collect();
    assert_eq!(skus, ["BK-1", "HP-1"]);
    let sku = GetProductBySkuRequest { sku: "HP-1".into() };
    let by_sku = c.get_product_by_sku(sku).await.expect("sku").into_inner();
    assert_eq!(by_sku.id, cat.headphones.id);
    let percent = ListProductsRequest {
        query: "%".into(),
        ..Default::default()
    };
    let e = c
        .list_products(percent)
        .await
        .expect("punctuation alone is a query that finds nothing");
    assert!(e.into_inner().products.is_empty());
}

/// Optimistic concurrency: a stale version is refused naming the current one. Archive: gone
/// for the public, visible to admins.
async fn versions_and_archive(c: &mut ProductsServiceClient<Channel>, cat: &Catalog) {
    let id = cat.headphones.id.clone();
    let update = |expected_version, price, name: Option<&str>| {
        admin(UpdateProductRequest {
            id: id.clone(),
            expected_version,
            price,
            name: name.map(str::to_owned),
            ..Default::default()
        })
    };
    let updated = c.update_product(update(1, eur(8_999), None)).await;
    let updated = updated.expect("update").into_inner();
    let price = updated.price.as_ref().map(|p| p.amount_minor);
    assert_eq!((updated.version, price), (2, Some(8_999)));
    let stale = c.update_product(update(1, None, Some("Lost update"))).await;
    let stale = stale.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(stale.message().contains("version 2"), "{}", stale.message());

    let archive = ArchiveProductRequest {
        id: id.clone(),
        expected_version: 2,
    };
    c.archive_product(admin(archive)).await.expect("archive");
    let get = || GetProductRequest { id: id.clone() };
    assert_eq!(
        c.get_product(get()).await.unwrap_err().code(),
        Code::NotFound
    );
    let seen = c
        .get_product(admin(get()))
        .await
        .expect("admin sees archived");
    assert!(!seen.into_inner().active);
    assert_eq!(list_all(c, ListProductsRequest::default()).await.len(), 2);
    let archived = ListProductsRequest {
        include_archived: true,
        ..Default::default()
    };
    let e = c.list_products(archived).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

/// The distinct event types on the catalog topic (delivery is at least once: one per id).
async fn catalog_event_types(log: &EmbeddedLog) -> Vec<String> {
    let mut events = std::collections::BTreeMap::new();
    let topic = "shopverse.catalog";
    for p in 0..log.partitions(topic).await.expect("partitions") {
        for r in log.fetch(topic, p, 0, 100).await.expect("fetch") {
            let id = r.header("event-id").unwrap_or_default().to_owned();
            events.insert(id, r.header("event-type").unwrap_or_default().to_owned());
        }
    }
    let mut types: Vec<String> = events.into_values().collect();
    types.sort();
    types
}

async fn catalog(database: Option<&str>) {
    let mut s = start(database).await;
    let cat = fill(&mut s.client).await;
    bad_input_is_refused(&mut s.client).await;
    browsing_finds_what_it_should(&mut s.client, &cat).await;
    versions_and_archive(&mut s.client, &cat).await;

    // Events: 3 created, 1 updated, 1 archived, 3 stock.changed.
    let want = [
        "product.archived",
        "product.created",
        "product.created",
        "product.created",
        "product.updated",
        "stock.changed",
        "stock.changed",
        "stock.changed",
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let types = catalog_event_types(&s.log).await;
        if types.len() == want.len() {
            assert_eq!(types, want);
            break;
        }
        let waiting = tokio::time::Instant::now() < deadline;
        assert!(waiting, "events so far: {types:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.server.stop().await;
}

#[tokio::test]
async fn catalog_sqlite() {
    catalog(None).await;
}

#[tokio::test]
async fn catalog_postgres() {
    let pg = PgTestDb::create()
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (see README)");
    catalog(Some(&pg.url)).await;
    pg.drop_db().await.expect("drop");
}

async fn pagination_is_stable_under_inserts(database: Option<&str>) {
    let mut s = start(database).await;
    let c = &mut s.client;
    for i in 0..25 {
        c.create_product(admin(new_product(
            &format!("P-{i:02}"),
            &format!("Item {i:02}"),
            100 + i,
            "",
            1,
        )))
        .await
        .expect("create");
    }
    for sort in [
        ProductSort::Newest,
        ProductSort::PriceAsc,
        ProductSort::PriceDesc,
        ProductSort::NameAsc,
    ] {
        let mut req = ListProductsRequest {
            page_size: 10,
            sort: sort.into(),
            ..Default::default()
        };
        let mut seen = Vec::new();
        let mut round = 0;
        loop {
            let page = c
                .list_products(req.clone())
                .await
                .expect("page")
                .into_inner();
            seen.extend(page.products.iter().map(|p| p.sku.clone()));
            // Someone adds products while we page.
            round += 1;
            c.create_product(admin(new_product(
                &format!("NEW-{}-{round}", sort.as_str_name()),
                "Zz late arrival",
                100,
                "",
                1,
            )))
            .await
            .expect("insert between pages");
            if page.next_page_token.is_empty() {
                break;
            }
            req.page_token = page.next_page_token;
        }
        let originals: Vec<&String> = seen.iter().filter(|s| s.starts_with("P-")).collect();
        let unique: HashSet<&&String> = originals.iter().collect();
        assert_eq!(
            originals.len(),
            25,
            "{sort:?}: every original product once: {seen:?}"
        );
        assert_eq!(unique.len(), 25, "{sort:?}: no duplicates");
    }
    let e = c
        .list_products(ListProductsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    s.server.stop().await;
}

#[tokio::test]
async fn pagination_is_stable_under_inserts_sqlite() {
    pagination_is_stable_under_inserts(None).await;
}

#[tokio::test]
async fn pagination_is_stable_under_inserts_postgres() {
    let pg = PgTestDb::create().await.expect("PostgreSQL");
    pagination_is_stable_under_inserts(Some(&pg.url)).await;
    pg.drop_db().await.expect("drop");
}

async fn stock_race(database: Option<&str>) {
    let mut s = start(database).await;
    let p = s
        .client
        .create_product(admin(new_product("LAST-10", "Scarce thing", 500, "", 10)))
        .await
        .expect("create")
        .into_inner();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut c = s.client.clone();
        let id = p.id.clone();
        tasks.push(tokio::spawn(async move {
            c.reserve_stock(ReserveStockRequest {
                order_id: format!("order-{i}"),
                lines: vec![ReservationLine {
                    product_id: id,
                    quantity: 1,
                }],
            })
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("join") {
            Ok(_) => ok += 1,
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
    assert_eq!(ok, 10, "exactly the last 10 units were reserved");
    let stock = s
        .client
        .get_stock(GetStockRequest {
            product_id: p.id.clone(),
        })
        .await
        .expect("stock")
        .into_inner();
    assert_eq!((stock.available, stock.reserved), (0, 10));
    s.server.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_reservations_for_the_last_ten_units_sqlite() {
    stock_race(None).await;
}

#[tokio::test]
async fn fifty_concurrent_reservations_for_the_last_ten_units_postgres() {
    let pg = PgTestDb::create().await.expect("PostgreSQL");
    stock_race(Some(&pg.url)).await;
    pg.drop_db().await.expect("drop");
}

/// A running service with product A (5 in stock) and product B (1 in stock).
async fn a_and_b() -> (Running, Product, Product) {
    let mut s = start(None).await;
    let a = s
        .client
        .create_product(admin(new_product("A", "A", 100, "", 5)))
        .await;
    let b = s
        .client
        .create_product(admin(new_product("B", "B", 100, "", 1)))
        .await;
    (s, a.expect("a").into_inner(), b.expect("b").into_inner())
}

fn line(p: &Product, quantity: i64) -> ReservationLine {
    ReservationLine {
        product_id: p.id.clone(),
        quantity,
    }
}

async fn reserve(
    c: &mut ProductsServiceClient<Channel>,
    order: &str,
    lines: Vec<ReservationLine>,
) -> Result<Reservation, tonic::Status> {
    let order_id = order.to_owned();
    let r = c
        .reserve_stock(ReserveStockRequest { order_id, lines })
        .await;
    r.map(tonic::Response::into_inner)
}

fn of(order: &str) -> ReservationRef {
    ReservationRef {
        order_id: order.into(),
    }
}

/// `(available, reserved)` of `p`.
async fn stock(c: &mut ProductsServiceClient<Channel>, p: &Product) -> (i64, i64) {
    let id = p.id.clone();
    let s = c.get_stock(GetStockRequest { product_id: id }).await;
    let s = s.expect("stock").into_inner();
    (s.available, s.reserved)
}

/// B has 1 unit: a reservation of 2 fails whole and A is untouched; an archived product cannot
/// be reserved either, and the rest of the reservation is untouched.
#[tokio::test]
async fn a_reservation_is_all_or_nothing() {
    let (mut s, a, b) = a_and_b().await;
    let c = &mut s.client;
    let e = reserve(c, "o1", vec![line(&a, 2), line(&b, 2)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(stock(c, &a).await, (5, 0));

    let archive = ArchiveProductRequest {
        id: b.id.clone(),
        expected_version: b.version,
    };
    c.archive_product(admin(archive)).await.expect("archive");
    let e = reserve(c, "o4", vec![line(&a, 1), line(&b, 1)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(stock(c, &a).await, (5, 0));
    s.server.stop().await;
}

/// Lines are merged and a reservation is idempotent per order; commit (paid) then release
/// (cancelled before shipping) return the units to the shelf; every stock change's event
/// carries the stock after it.
#[tokio::test]
async fn a_reservation_is_idempotent_per_order_and_settles() {
    let (mut s, a, b) = a_and_b().await;
    let c = &mut s.client;
    let lines = || vec![line(&a, 1), line(&b, 1), line(&a, 1)];
    let r1 = reserve(c, "o2", lines()).await.expect("reserve");
    let r2 = reserve(c, "o2", lines()).await.expect("again");
    assert_eq!(r1, r2);
    assert_eq!(r1.state(), ReservationState::Held);
    assert_eq!(stock(c, &a).await, (3, 2));
    let e = reserve(c, "o2", vec![line(&a, 3)]).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "same order, other lines"
    );

    let r = c.commit_reservation(of("o2")).await.expect("commit");
    assert_eq!(r.into_inner().state(), ReservationState::Committed);
    c.commit_reservation(of("o2"))
        .await
        .expect("commit is idempotent");
    assert_eq!(stock(c, &a).await, (3, 0));
    c.release_reservation(of("o2")).await.expect("release");
    assert_eq!((stock(c, &a).await, stock(c, &b).await), ((5, 0), (1, 0)));
    let e = c.commit_reservation(of("o2")).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "released cannot be committed"
    );

    let want: Vec<(String, i64, i64)> = [
        ("set", 5, 0),
        ("reserved", 3, 2),
        ("committed", 3, 0),
        ("released", 5, 0),
    ]
    .map(|(r, av, re)| (r.to_owned(), av, re))
    .into();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = stock_events(&s.log, &a.id).await;
        if got == want {
            break;
        }
        let waiting = got.len() < want.len() && tokio::time::Instant::now() < deadline;
        assert!(waiting, "stock events of A: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.server.stop().await;
}

/// A held reservation released returns its units; releasing one that never was is not found.
#[tokio::test]
async fn a_held_reservation_is_released() {
    let (mut s, _, b) = a_and_b().await;
    let c = &mut s.client;
    reserve(c, "o3", vec![line(&b, 1)]).await.expect("reserve");
    assert_eq!(stock(c, &b).await, (0, 1));
    c.release_reservation(of("o3")).await.expect("release");
    assert_eq!(stock(c, &b).await, (1, 0));
    let e = c.release_reservation(of("nope")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    s.server.stop().await;
}

/// `(reason, available, reserved)` of each `stock.changed` event of `product`, in log order,
/// each event once.
async fn stock_events(log: &EmbeddedLog, product: &str) -> Vec<(String, i64, i64)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for p in 0..log
        .partitions("shopverse.catalog")
        .await
        .expect("partitions")
    {
        for r in log
            .fetch("shopverse.catalog", p, 0, 1000)
            .await
            .expect("fetch")
        {
            if r.key != product || r.header("event-type") != Some("stock.changed") {
                continue;
            }
            let env = shopverse_events::envelope::decode_envelope(&r.payload).expect("envelope");
            if !seen.insert(env.id.clone()) {
                continue;
            }
            let changed: StockChanged =
                shopverse_events::envelope::decode_payload(&env).expect("payload");
            let stock = changed.stock.expect("stock");
            out.push((changed.reason, stock.available, stock.reserved));
        }
    }
    out
}

#[tokio::test]
async fn the_demo_seed_is_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ProductsConfig::default();
    let db = shopverse_runtime::open_db::<shopverse_products::ProductsService>(&config, dir.path())
        .await
        .expect("db");
    let products = shopverse_products::Products::standalone(db, config, Arc::new(SystemClock));
    let first = shopverse_products::seed::seed_demo(&products)
        .await
        .expect("seed");
    assert_eq!(first.categories_created, 8);
    assert!(first.products_created >= 50, "{first:?}");
    let again = shopverse_products::seed::seed_demo(&products)
        .await
        .expect("seed again");
    assert_eq!((again.categories_created, again.products_created), (0, 0));
    let cats = products.list_categories().await.expect("categories");
    assert!(cats.iter().filter(|c| c.parent_id.is_empty()).count() >= 5);
}
