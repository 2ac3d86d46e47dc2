//! Search over gRPC on SQLite and PostgreSQL: ranking, prefixes, typos, filters, facets, and
//! pages that stay still while products are added.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::collections::{HashMap, HashSet};

use shopverse_kit::testing::PgTestDb;
use shopverse_products::ProductsConfig;
use shopverse_proto::products::v1::products_service_client::ProductsServiceClient;
use shopverse_proto::products::v1::*;
use tonic::Code;
use tonic::transport::Channel;

mod common;
use common::*;

type Client = ProductsServiceClient<Channel>;

fn product(sku: &str, name: &str, description: &str, cents: i64) -> CreateProductRequest {
    CreateProductRequest {
        sku: sku.into(),
        name: name.into(),
        description: description.into(),
        price: eur(cents),
        initial_stock: 1,
        ..Default::default()
    }
}

async fn search(c: &mut Client, query: &str) -> ListProductsResponse {
    c.list_products(ListProductsRequest {
        query: query.into(),
        ..Default::default()
    })
    .await
    .expect("search")
    .into_inner()
}

fn skus(r: &ListProductsResponse) -> Vec<&str> {
    r.products.iter().map(|p| p.sku.as_str()).collect()
}

/// Runs `test` on SQLite, then on a fresh PostgreSQL database.
macro_rules! on_both {
    ($sqlite:ident, $postgres:ident, $body:ident) => {
        #[tokio::test]
        async fn $sqlite() {
            $body(None).await;
        }
        #[tokio::test]
        async fn $postgres() {
            let pg = PgTestDb::create()
                .await
                .expect("PostgreSQL at 127.0.0.1:5432 (see README)");
            $body(Some(&pg.url)).await;
            pg.drop_db().await.expect("drop");
        }
    };
}

async fn ranking_prefixes_and_typos(database: Option<&str>) {
    let mut s = start(database).await;
    let c = &mut s.client;
    create(c, product("LAMP", "Brass Desk Lamp", "Warm light.", 4_900)).await;
    // Newer, and "lamp" only in its description, twice.
    create(
        c,
        product(
            "LIGHT",
            "Reading Light",
            "A lamp for any desk; the lamp clips on.",
            2_900,
        ),
    )
    .await;
    let mut hp = product("HP", "Studio Headphones", "Closed back.", 9_900);
    hp.attributes.insert("brand".into(), "Northwind".into());
    create(c, hp).await;
    create(
        c,
        product("HPB", "Headphone Stand", "Holds headphones.", 1_900),
    )
    .await;

    // The name outranks the description, whatever the age and the repeats.
    assert_eq!(skus(&search(c, "lamp").await), ["LAMP", "LIGHT"]);
    assert_eq!(
        skus(&search(c, "LAMP!").await),
        ["LAMP", "LIGHT"],
        "case and punctuation"
    );
    // Every word must match; the last also as a prefix.
    assert_eq!(skus(&search(c, "desk la").await), ["LAMP", "LIGHT"]);
    assert_eq!(skus(&search(c, "brass li").await), ["LAMP"], "li: light");
    assert_eq!(skus(&search(c, "studio headph").await), ["HP"]);
    assert!(search(c, "lamp headphones").await.products.is_empty());
    // Whole words elsewhere than last: "headphone" is not "headphones".
    assert_eq!(skus(&search(c, "headphone stand").await), ["HPB"]);
    // Attribute values are searched too.
    assert_eq!(skus(&search(c, "northwind").await), ["HP"]);

    // A misspelt word of five letters or more is corrected when nothing matches.
    let r = search(c, "headphnoes").await;
    assert_eq!(r.corrected_query, "headphones");
    assert_eq!(skus(&r), ["HP", "HPB"]);
    let r = search(c, "studio headphnes").await;
    assert_eq!(
        (r.corrected_query.as_str(), skus(&r)),
        ("studio headphones", vec!["HP"])
    );
    let r = search(c, "brasss").await;
    assert_eq!(
        (r.corrected_query.as_str(), skus(&r)),
        ("brass", vec!["LAMP"])
    );
    // Shorter words are not, nor are words two edits away, nor a query that found something.
    let r = search(c, "lmap").await;
    assert!(r.products.is_empty() && r.corrected_query.is_empty());
    assert!(search(c, "hedphnoes").await.products.is_empty());
    assert!(search(c, "lamp").await.corrected_query.is_empty());

    // Other orders still work with a query.
    let by_price = c
        .list_products(ListProductsRequest {
            query: "lamp".into(),
            sort: ProductSort::PriceAsc.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(skus(&by_price), ["LIGHT", "LAMP"]);
    let e = c
        .list_products(ListProductsRequest {
            sort: ProductSort::Relevance.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "relevance needs a query");

    // An edit is searchable as soon as it is acknowledged, and the old words are gone.
    let lamp = search(c, "brass").await.products.remove(0);
    c.update_product(admin(UpdateProductRequest {
        id: lamp.id.clone(),
        expected_version: lamp.version,
        name: Some("Copper Desk Lamp".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(skus(&search(c, "copper").await), ["LAMP"]);
    let r = search(c, "brass").await;
    assert!(
        r.products.is_empty(),
        "the old name is gone: {:?}",
        skus(&r)
    );
    // Archived products are not found, nor corrected to.
    let lamp = search(c, "copper").await.products.remove(0);
    c.archive_product(admin(ArchiveProductRequest {
        id: lamp.id,
        expected_version: lamp.version,
    }))
    .await
    .unwrap();
    assert_eq!(skus(&search(c, "lamp").await), ["LIGHT"]);
    let r = search(c, "copperr").await;
    assert!(
        r.products.is_empty() && r.corrected_query.is_empty(),
        "{r:?}"
    );
    s.server.stop().await;
}
on_both!(
    ranking_prefixes_and_typos_sqlite,
    ranking_prefixes_and_typos_postgres,
    ranking_prefixes_and_typos
);

async fn facets(c: &mut Client, req: ListProductsRequest) -> (Facets, usize) {
    let listed = list_all(c, req.clone()).await.len();
    let r = c
        .list_products(ListProductsRequest {
            facets: true,
            ..req
        })
        .await
        .expect("facets")
        .into_inner();
    (r.facets.expect("facets asked for"), listed)
}

/// `(category id, products)` of a facet set.
fn by_category(f: &Facets) -> HashMap<String, i64> {
    f.categories
        .iter()
        .map(|c| (c.category_id.clone(), c.products))
        .collect()
}

async fn facets_and_filters(database: Option<&str>) {
    let mut s = start(database).await;
    let c = &mut s.client;
    let electronics = category(c, "Electronics", "").await;
    let audio = category(c, "Audio", &electronics).await;
    let books = category(c, "Books", "").await;
    let items = [
        ("A1", "Studio Headphones", 9_900, &audio, "Acme"),
        ("A2", "Travel Headphones", 4_900, &audio, "Northwind"),
        ("A3", "Bluetooth Speaker", 2_400, &audio, "Northwind"),
        ("E1", "Television", 49_900, &electronics, "Acme"),
        ("B1", "Headphones: A History", 1_500, &books, "Fjord"),
        ("B2", "Cooking for One", 900, &books, "Fjord"),
        (
            "N1",
            "Gift Card Headphones",
            250_000,
            &String::new(),
            "Acme",
        ),
    ];
    for (sku, name, cents, cat, brand) in items {
        let mut p = product(sku, name, "", cents);
        p.category_id = cat.clone();
        p.attributes.insert("brand".into(), brand.into());
        create(c, p).await;
    }

    // Every active product: the counts kept by writes.
    let (f, listed) = facets(c, ListProductsRequest::default()).await;
    assert_eq!((f.total, listed), (7, 7));
    let cats = by_category(&f);
    assert_eq!(cats[&electronics], 4, "Electronics counts Audio's products");
    assert_eq!((cats[&audio], cats[&books]), (3, 2));
    let bands: Vec<i64> = f.price_bands.iter().map(|b| b.products).collect();
    assert_eq!(bands, [1, 2, 1, 1, 0, 1, 0, 1]);
    assert_eq!(
        bands.iter().sum::<i64>(),
        f.total,
        "bands add up to the total"
    );
    assert_eq!(
        (f.price_bands[0].min_minor, f.price_bands[0].max_minor),
        (0, Some(1_000))
    );
    assert_eq!(f.price_bands[7].max_minor, None);

    // A category: it and its subcategories.
    let in_electronics = ListProductsRequest {
        category_id: electronics.clone(),
        ..Default::default()
    };
    let (f, listed) = facets(c, in_electronics.clone()).await;
    assert_eq!((f.total, listed), (4, 4));
    assert_eq!(by_category(&f).get(&books), None);

    // A query, an attribute and a price range combine; the facets count what is listed.
    let q = ListProductsRequest {
        query: "headphones".into(),
        ..Default::default()
    };
    let (f, listed) = facets(c, q.clone()).await;
    assert_eq!((f.total, listed), (4, 4));
    let narrowed = ListProductsRequest {
        attribute: vec!["brand:ACME".into()],
        max_price_minor: Some(10_000),
        ..q.clone()
    };
    let found = list_all(c, narrowed.clone()).await;
    assert_eq!(
        found.iter().map(|p| p.sku.as_str()).collect::<Vec<_>>(),
        ["A1"]
    );
    let (f, _) = facets(c, narrowed).await;
    assert_eq!((f.total, by_category(&f)[&electronics]), (1, 1));
    let two_brands = ListProductsRequest {
        attribute: vec!["brand=northwind".into()],
        min_price_minor: Some(2_400),
        ..in_electronics.clone()
    };
    let found = list_all(c, two_brands).await;
    let mut got: Vec<&str> = found.iter().map(|p| p.sku.as_str()).collect();
    got.sort();
    assert_eq!(got, ["A2", "A3"], "min price inclusive");

    // Bad filters are refused.
    for bad in [
        ListProductsRequest {
            attribute: vec!["brand".into()],
            ..Default::default()
        },
        ListProductsRequest {
            min_price_minor: Some(10),
            max_price_minor: Some(5),
            ..Default::default()
        },
        ListProductsRequest {
            min_price_minor: Some(-1),
            ..Default::default()
        },
    ] {
        let e = c.list_products(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }

    // Edits move products between cells; the kept counts agree with counting the rows (a
    // filter that selects everything takes the counting path).
    let tv = list_all(c, in_electronics.clone())
        .await
        .into_iter()
        .find(|p| p.sku == "E1")
        .unwrap();
    c.update_product(admin(UpdateProductRequest {
        id: tv.id.clone(),
        expected_version: tv.version,
        price: eur(800),
        category_id: Some(books.clone()),
        ..Default::default()
    }))
    .await
    .unwrap();
    let a3 = list_all(c, ListProductsRequest::default())
        .await
        .into_iter()
        .find(|p| p.sku == "A3")
        .unwrap();
    c.archive_product(admin(ArchiveProductRequest {
        id: a3.id,
        expected_version: a3.version,
    }))
    .await
    .unwrap();
    let (kept, listed) = facets(c, ListProductsRequest::default()).await;
    let counted = facets(
        c,
        ListProductsRequest {
            min_price_minor: Some(0),
            ..Default::default()
        },
    )
    .await
    .0;
    assert_eq!((kept.total, listed), (6, 6));
    assert_eq!(by_category(&kept), by_category(&counted));
    assert_eq!(kept.price_bands, counted.price_bands);
    assert_eq!(by_category(&kept)[&electronics], 2);
    assert_eq!(by_category(&kept)[&books], 3);
    assert_eq!(
        kept.price_bands[0].products, 2,
        "the television moved to band 0"
    );
    s.server.stop().await;
}
on_both!(
    facets_and_filters_sqlite,
    facets_and_filters_postgres,
    facets_and_filters
);

/// With a rank window of 20, 60 matches span both groups, their windows and the older
/// matches after them; products added between pages change nothing.
async fn search_pages_hold_still(database: Option<&str>) {
    let config = ProductsConfig {
        search_rank_window: 20,
        ..ProductsConfig::default()
    };
    let mut s = start_with(database, config).await;
    let c = &mut s.client;
    let filler = [
        "",
        " big",
        " big blue",
        " big blue round",
        " very big blue round",
    ];
    for i in 0..30 {
        let extra = filler[i % filler.len()];
        create(
            c,
            product(&format!("N{i:02}"), &format!("Widget{extra} {i}"), "", 100),
        )
        .await;
        create(
            c,
            product(
                &format!("D{i:02}"),
                &format!("Gadget {i}"),
                "Fits any widget",
                100,
            ),
        )
        .await;
    }
    for page_size in [7, 20, 100] {
        let mut req = ListProductsRequest {
            query: "widget".into(),
            page_size,
            ..Default::default()
        };
        let mut seen: Vec<String> = Vec::new();
        let mut round = 0;
        loop {
            let page = c.list_products(req.clone()).await.unwrap().into_inner();
            seen.extend(page.products.iter().map(|p| p.sku.clone()));
            round += 1;
            create(
                c,
                product(
                    &format!("L{page_size}-{round}"),
                    "Widget late",
                    "widget",
                    100,
                ),
            )
            .await;
            if page.next_page_token.is_empty() {
                break;
            }
            req.page_token = page.next_page_token;
            assert!(round < 50, "pages end");
        }
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "no duplicates: {seen:?}");
        let late = format!("L{page_size}-");
        assert!(!seen.iter().any(|s| s.starts_with(&late)), "{seen:?}");
        // Products added during an earlier loop are old now and take part.
        let originals: Vec<&String> = seen.iter().filter(|s| !s.starts_with('L')).collect();
        assert_eq!(originals.len(), 60, "no gaps: {seen:?}");
        let first_rest = originals.iter().position(|s| s.starts_with('D')).unwrap();
        assert!(
            originals[..first_rest].iter().all(|s| s.starts_with('N')) && first_rest == 30,
            "name matches first: {seen:?}"
        );
        let first_rest = seen.iter().position(|s| s.starts_with('D')).unwrap();
        assert!(
            !seen[first_rest..].iter().any(|s| s.starts_with('L')),
            "{seen:?}"
        );
        // In the first window, a short name beats a long one.
        let pos = |sku: &str| seen.iter().position(|s| s == sku).unwrap();
        assert!(pos("N25") < pos("N29"), "{seen:?}");
    }
    // A token only continues its own query.
    let page = c
        .list_products(ListProductsRequest {
            query: "widget".into(),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = c
        .list_products(ListProductsRequest {
            query: "gadget".into(),
            page_token: page.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    s.server.stop().await;
}
on_both!(
    search_pages_hold_still_sqlite,
    search_pages_hold_still_postgres,
    search_pages_hold_still
);

/// A catalog written before search existed is indexed when the service starts: found,
/// counted in the facets, and its words known to the typo correction.
async fn an_older_catalog_is_indexed_at_start(database: Option<&str>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = database
        .map(str::to_owned)
        .unwrap_or_else(|| format!("sqlite://{}/products.db", dir.path().display()));
    let db = shopverse_storage::Db::connect(&url, 2).await.expect("db");
    db.migrate(&[&shopverse_products::MIGRATIONS[..1]])
        .await
        .expect("the first migration alone");
    for (i, (name, active)) in [("Enamel Kettle", 1), ("Glass Kettle", 1), ("Old Kettle", 0)]
        .into_iter()
        .enumerate()
    {
        sqlx::query(
            "INSERT INTO products (id, sku, name, description, price_minor, currency, category_id, \
             attributes, image_urls, active, version, search_text, sort_name, created_at, updated_at) \
             VALUES ($1, $2, $3, 'Boils water.', 3000, 'EUR', NULL, '{\"brand\":\"Fjord\"}', '[]', $4, 1, \
             $5, $6, $7, $7)",
        )
        .bind(format!("00000000-0000-0000-0000-00000000000{i}"))
        .bind(format!("OLD-{i}"))
        .bind(name)
        .bind(active)
        .bind(format!("{name}\nboils water.").to_lowercase())
        .bind(name.to_lowercase())
        .bind(1_000 + i as i64)
        .execute(&mut *db.write_conn().await.expect("conn"))
        .await
        .expect("insert as the first version did");
    }
    db.close().await;

    let mut s = start(Some(&url)).await;
    let c = &mut s.client;
    // Both in the name, equally long: the newer first. The archived one is not found.
    assert_eq!(skus(&search(c, "kettle").await), ["OLD-1", "OLD-0"]);
    assert_eq!(skus(&search(c, "fjord enamel").await), ["OLD-0"]);
    let r = search(c, "kettel").await;
    assert_eq!(
        (r.corrected_query.as_str(), r.products.len()),
        ("kettle", 2)
    );
    let (f, listed) = facets(c, ListProductsRequest::default()).await;
    assert_eq!((f.total, listed), (2, 2));
    // Edits after the upgrade keep the index right.
    let glass = search(c, "glass").await.products.remove(0);
    c.update_product(admin(UpdateProductRequest {
        id: glass.id,
        expected_version: glass.version,
        name: Some("Glass Teapot".into()),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(skus(&search(c, "kettle").await), ["OLD-0"]);
    assert_eq!(skus(&search(c, "teapot").await), ["OLD-1"]);
    s.server.stop().await;
}
on_both!(
    an_older_catalog_is_indexed_at_start_sqlite,
    an_older_catalog_is_indexed_at_start_postgres,
    an_older_catalog_is_indexed_at_start
);

/// A word in every name, in a catalog large for its rank window: PostgreSQL walks the
/// newest-first index rather than reading every match (the vocabulary's estimate, 100, is
/// above sqrt(20 x 100 / 8.5)); every product still comes once, newest first among equals.
async fn a_word_in_every_name_pages_through_all(database: Option<&str>) {
    let config = ProductsConfig {
        search_rank_window: 20,
        ..ProductsConfig::default()
    };
    let mut s = start_with(database, config).await;
    let c = &mut s.client;
    for i in 0..100 {
        create(
            c,
            product(&format!("L{i:03}"), &format!("Lamp {i:03}"), "", 100),
        )
        .await;
    }
    let all = list_all(
        c,
        ListProductsRequest {
            query: "lamp".into(),
            page_size: 30,
            ..Default::default()
        },
    )
    .await;
    let got: Vec<&str> = all.iter().map(|p| p.sku.as_str()).collect();
    let want: Vec<String> = (0..100).rev().map(|i| format!("L{i:03}")).collect();
    assert_eq!(got, want, "equal scores: newest first, each once");
    // The same with a last word completed, and with one no product holds.
    assert_eq!(
        list_all(
            c,
            ListProductsRequest {
                query: "lam".into(),
                ..Default::default()
            }
        )
        .await
        .len(),
        100
    );
    assert!(search(c, "lamp zzzzz").await.products.is_empty());
    s.server.stop().await;
}
on_both!(
    a_word_in_every_name_pages_through_all_sqlite,
    a_word_in_every_name_pages_through_all_postgres,
    a_word_in_every_name_pages_through_all
);
