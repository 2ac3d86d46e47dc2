//! The products service over gRPC on a port-0 server, on SQLite and on PostgreSQL.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use shopverse_events::EventBus;
use shopverse_events::embedded::EmbeddedLog;
use shopverse_kit::testing::{PgTestDb, Spawned, as_user, channel, spawn};
use shopverse_kit::{Role, SystemClock};
use shopverse_products::ProductsConfig;
use shopverse_proto::common::v1::Money;
use shopverse_proto::products::v1::products_service_client::ProductsServiceClient;
use shopverse_proto::products::v1::*;
use tonic::Code;
use tonic::transport::Channel;

struct Running {
    client: ProductsServiceClient<Channel>,
    server: Spawned<shopverse_runtime::RunError>,
    log: EmbeddedLog,
    _dir: tempfile::TempDir,
}

async fn start(database: Option<&str>) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let (platform, log) = shopverse_runtime::testing::platform(dir.path(), Arc::new(SystemClock))
        .await
        .expect("platform");
    let config = ProductsConfig {
        database: database.unwrap_or_default().to_owned(),
        ..ProductsConfig::default()
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

fn admin<T>(m: T) -> tonic::Request<T> {
    as_user(m, "admin-1", &[Role::Admin])
}

fn eur(cents: i64) -> Option<Money> {
    Some(Money {
        amount_minor: cents,
        currency: "EUR".into(),
    })
}

fn new_product(
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

async fn category(c: &mut ProductsServiceClient<Channel>, name: &str, parent: &str) -> String {
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

async fn list_all(
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

async fn catalog(database: Option<&str>) {
    let mut s = start(database).await;
    let c = &mut s.client;

    let electronics = category(c, "Electronics", "").await;
    let audio = category(c, "Audio", &electronics).await;
    let books = category(c, "Books", "").await;
    let cats = c
        .list_categories(ListCategoriesRequest {})
        .await
        .expect("categories")
        .into_inner();
    let slugs: Vec<&str> = cats.categories.iter().map(|c| c.slug.as_str()).collect();
    assert_eq!(
        slugs,
        vec!["books", "electronics", "audio"],
        "parents before children"
    );
    let e = c
        .create_category(admin(CreateCategoryRequest {
            name: "Audio".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    let headphones = c
        .create_product(admin(new_product(
            "HP-1",
            "Studio Headphones",
            9_999,
            &audio,
            5,
        )))
        .await
        .expect("create")
        .into_inner();
    assert_eq!(headphones.version, 1);
    c.create_product(admin(new_product(
        "TV-1",
        "Television",
        49_900,
        &electronics,
        2,
    )))
    .await
    .expect("create");
    c.create_product(admin(new_product(
        "BK-1",
        "A Book About Headphones",
        1_999,
        &books,
        50,
    )))
    .await
    .expect("create");

    // Bad input, each with its own code.
    let e = c
        .create_product(admin(new_product("HP-1", "Dup", 1, "", 0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = c
        .create_product(admin(new_product("bad sku!", "X", 1, "", 0)))
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message().starts_with("sku:")),
        (Code::InvalidArgument, true)
    );
    let e = c
        .create_product(admin(new_product("NEG", "X", -5, "", 0)))
        .await
        .unwrap_err();
    assert!(
        e.message().starts_with("price.amount_minor:"),
        "{}",
        e.message()
    );
    let e = c
        .create_product(new_product("ANON", "X", 1, "", 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = c
        .create_product(as_user(
            new_product("CUST", "X", 1, "", 0),
            "u",
            &[Role::Customer],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .get_product(GetProductRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Browsing: category with its subcategories, text, sort.
    let in_electronics = list_all(
        c,
        ListProductsRequest {
            category_id: electronics.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(in_electronics.len(), 2, "Audio is under Electronics");
    let found = list_all(
        c,
        ListProductsRequest {
            query: "HEADPHONES".into(),
            sort: ProductSort::PriceAsc.into(),
            ..Default::default()
        },
    )
    .await;
    let skus: Vec<&str> = found.iter().map(|p| p.sku.as_str()).collect();
    assert_eq!(skus, vec!["BK-1", "HP-1"]);
    let by_sku = c
        .get_product_by_sku(GetProductBySkuRequest { sku: "HP-1".into() })
        .await
        .expect("sku")
        .into_inner();
    assert_eq!(by_sku.id, headphones.id);
    let e = c
        .list_products(ListProductsRequest {
            query: "%".into(),
            ..Default::default()
        })
        .await
        .expect("a wildcard is a literal");
    assert!(e.into_inner().products.is_empty());

    // Optimistic concurrency.
    let updated = c
        .update_product(admin(UpdateProductRequest {
            id: headphones.id.clone(),
            expected_version: 1,
            price: eur(8_999),
            ..Default::default()
        }))
        .await
        .expect("update")
        .into_inner();
    assert_eq!(
        (
            updated.version,
            updated.price.as_ref().map(|p| p.amount_minor)
        ),
        (2, Some(8_999))
    );
    let stale = c
        .update_product(admin(UpdateProductRequest {
            id: headphones.id.clone(),
            expected_version: 1,
            name: Some("Lost update".into()),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(stale.message().contains("version 2"), "{}", stale.message());

    // Archive: gone for the public, visible to admins.
    c.archive_product(admin(ArchiveProductRequest {
        id: headphones.id.clone(),
        expected_version: 2,
    }))
    .await
    .expect("archive");
    assert_eq!(
        c.get_product(GetProductRequest {
            id: headphones.id.clone()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    let seen = c
        .get_product(admin(GetProductRequest {
            id: headphones.id.clone(),
        }))
        .await
        .expect("admin sees archived")
        .into_inner();
    assert!(!seen.active);
    assert_eq!(list_all(c, ListProductsRequest::default()).await.len(), 2);
    let e = c
        .list_products(ListProductsRequest {
            include_archived: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Events: 3 created, 1 updated, 1 archived, 3 stock.changed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Delivery is at least once: count distinct events.
        let mut events = std::collections::BTreeMap::new();
        for p in 0..s
            .log
            .partitions("shopverse.catalog")
            .await
            .expect("partitions")
        {
            for r in s
                .log
                .fetch("shopverse.catalog", p, 0, 100)
                .await
                .expect("fetch")
            {
                let id = r.header("event-id").unwrap_or_default().to_owned();
                events.insert(id, r.header("event-type").unwrap_or_default().to_owned());
            }
        }
        let mut types: Vec<String> = events.into_values().collect();
        types.sort();
        if types.len() == 8 {
            assert_eq!(
                types,
                vec![
                    "product.archived",
                    "product.created",
                    "product.created",
                    "product.created",
                    "product.updated",
                    "stock.changed",
                    "stock.changed",
                    "stock.changed"
                ]
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events so far: {types:?}"
        );
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

#[tokio::test]
async fn reservations_are_all_or_nothing_idempotent_and_settle() {
    let mut s = start(None).await;
    let c = &mut s.client;
    let a = c
        .create_product(admin(new_product("A", "A", 100, "", 5)))
        .await
        .expect("a")
        .into_inner();
    let b = c
        .create_product(admin(new_product("B", "B", 100, "", 1)))
        .await
        .expect("b")
        .into_inner();
    let line = |p: &Product, q| ReservationLine {
        product_id: p.id.clone(),
        quantity: q,
    };
    let stock = |c: &mut ProductsServiceClient<Channel>, id: String| {
        let mut c = c.clone();
        async move {
            let s = c
                .get_stock(GetStockRequest { product_id: id })
                .await
                .expect("stock")
                .into_inner();
            (s.available, s.reserved)
        }
    };

    // B has 1 unit: the whole reservation fails and A is untouched.
    let e = c
        .reserve_stock(ReserveStockRequest {
            order_id: "o1".into(),
            lines: vec![line(&a, 2), line(&b, 2)],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(stock(c, a.id.clone()).await, (5, 0));

    // Merged lines, idempotent per order.
    let req = ReserveStockRequest {
        order_id: "o2".into(),
        lines: vec![line(&a, 1), line(&b, 1), line(&a, 1)],
    };
    let r1 = c
        .reserve_stock(req.clone())
        .await
        .expect("reserve")
        .into_inner();
    let r2 = c.reserve_stock(req).await.expect("again").into_inner();
    assert_eq!(r1, r2);
    assert_eq!(r1.state(), ReservationState::Held);
    assert_eq!(stock(c, a.id.clone()).await, (3, 2));
    let e = c
        .reserve_stock(ReserveStockRequest {
            order_id: "o2".into(),
            lines: vec![line(&a, 3)],
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "same order, other lines"
    );

    // Commit (paid) then release (cancelled before shipping): units return to the shelf.
    let r = c
        .commit_reservation(ReservationRef {
            order_id: "o2".into(),
        })
        .await
        .expect("commit")
        .into_inner();
    assert_eq!(r.state(), ReservationState::Committed);
    c.commit_reservation(ReservationRef {
        order_id: "o2".into(),
    })
    .await
    .expect("commit is idempotent");
    assert_eq!(stock(c, a.id.clone()).await, (3, 0));
    c.release_reservation(ReservationRef {
        order_id: "o2".into(),
    })
    .await
    .expect("release");
    assert_eq!(stock(c, a.id.clone()).await, (5, 0));
    assert_eq!(stock(c, b.id.clone()).await, (1, 0));
    let e = c
        .commit_reservation(ReservationRef {
            order_id: "o2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "released cannot be committed"
    );

    // Held then released.
    c.reserve_stock(ReserveStockRequest {
        order_id: "o3".into(),
        lines: vec![line(&b, 1)],
    })
    .await
    .expect("reserve");
    assert_eq!(stock(c, b.id.clone()).await, (0, 1));
    c.release_reservation(ReservationRef {
        order_id: "o3".into(),
    })
    .await
    .expect("release");
    assert_eq!(stock(c, b.id.clone()).await, (1, 0));
    let e = c
        .release_reservation(ReservationRef {
            order_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // An archived product cannot be reserved, and the rest of the reservation is untouched.
    c.archive_product(admin(ArchiveProductRequest {
        id: b.id.clone(),
        expected_version: b.version,
    }))
    .await
    .expect("archive");
    let e = c
        .reserve_stock(ReserveStockRequest {
            order_id: "o4".into(),
            lines: vec![line(&a, 1), line(&b, 1)],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(stock(c, a.id.clone()).await, (5, 0));

    // Every stock change's event carries the stock after it.
    let want: Vec<(String, i64, i64)> = [
        ("set", 5, 0),
        ("reserved", 3, 2),
        ("committed", 3, 0),
        ("released", 5, 0),
    ]
    .into_iter()
    .map(|(r, av, re)| (r.to_owned(), av, re))
    .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = stock_events(&s.log, &a.id).await;
        if got == want {
            break;
        }
        assert!(
            got.len() < want.len() && tokio::time::Instant::now() < deadline,
            "stock events of A: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
