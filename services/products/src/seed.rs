//! The demo catalog: 8 categories (two of them nested) and 60 products, the same every time.
//! Seeding is idempotent: categories are matched by slug and products by SKU, so running it again
//! (or on a catalog an admin has since edited) adds only what is missing.

use std::collections::HashMap;

use shopverse_kit::ServiceError;
use shopverse_proto::common::v1::Money;
use shopverse_proto::products::v1::{CreateCategoryRequest, CreateProductRequest};

use crate::app::Products;

/// `(slug, name, parent slug)`
const CATEGORIES: &[(&str, &str, Option<&str>)] = &[
    ("electronics", "Electronics", None),
    ("audio", "Audio", Some("electronics")),
    ("computers", "Computers", Some("electronics")),
    ("home-kitchen", "Home & Kitchen", None),
    ("books", "Books", None),
    ("clothing", "Clothing", None),
    ("sports-outdoors", "Sports & Outdoors", None),
    ("toys-games", "Toys & Games", None),
];

/// `(name, description, price in cents)`
type DemoProduct = (&'static str, &'static str, i64);

/// `(category slug, products)`
const PRODUCTS: &[(&str, &[DemoProduct])] = &[
    (
        "audio",
        &[
            (
                "Aurora Wireless Headphones",
                "Over-ear, active noise cancelling, 30 h battery.",
                14_999,
            ),
            (
                "Pebble Earbuds",
                "True wireless earbuds with a pocket-sized charging case.",
                5_999,
            ),
            (
                "Boom Cube Speaker",
                "Water-resistant portable speaker with deep bass.",
                7_999,
            ),
            (
                "Studio Monitor Pair",
                "Two active bookshelf monitors for a home studio.",
                29_900,
            ),
            (
                "Vinyl Turntable",
                "Belt-drive turntable with a built-in preamp.",
                18_900,
            ),
            (
                "Podcast Microphone",
                "USB condenser microphone with a desk stand.",
                8_999,
            ),
        ],
    ),
    (
        "computers",
        &[
            (
                "Nimbus 14 Laptop",
                "14-inch ultralight laptop, 16 GB RAM, 512 GB SSD.",
                119_900,
            ),
            (
                "Forge Mechanical Keyboard",
                "Tenkeyless, hot-swappable switches, backlit.",
                10_900,
            ),
            (
                "Glide Wireless Mouse",
                "Ergonomic mouse with a silent click.",
                3_999,
            ),
            (
                "UltraView 27 Monitor",
                "27-inch 4K IPS monitor with USB-C.",
                39_900,
            ),
            (
                "Dock Pro USB-C Hub",
                "Eleven ports, 100 W pass-through charging.",
                8_900,
            ),
            (
                "Portable SSD 1 TB",
                "Pocket SSD, 1050 MB/s, shock resistant.",
                11_900,
            ),
            (
                "Webcam HD 1080p",
                "Full HD webcam with privacy shutter.",
                4_999,
            ),
        ],
    ),
    (
        "electronics",
        &[
            (
                "Smart Plug Duo",
                "Two Wi-Fi plugs with energy monitoring.",
                2_499,
            ),
            (
                "E-Reader Paper 6",
                "Glare-free 6-inch e-ink reader with a front light.",
                10_999,
            ),
            (
                "Action Camera 4K",
                "Waterproof 4K camera with stabilisation.",
                24_900,
            ),
        ],
    ),
    (
        "home-kitchen",
        &[
            (
                "Cast Iron Skillet",
                "Pre-seasoned 26 cm skillet for oven and stove.",
                3_499,
            ),
            (
                "Pour-Over Coffee Set",
                "Glass dripper, carafe and 100 filters.",
                2_999,
            ),
            (
                "Chef's Knife 20 cm",
                "Forged stainless steel chef's knife.",
                6_900,
            ),
            (
                "Linen Bedding Set",
                "Stonewashed linen duvet cover and two pillowcases.",
                12_900,
            ),
            (
                "Bamboo Cutting Board",
                "Large reversible board with a juice groove.",
                2_499,
            ),
            (
                "Electric Kettle",
                "1.7 l kettle with temperature control.",
                4_999,
            ),
            (
                "Ceramic Dinner Plates",
                "Set of four stoneware plates.",
                3_900,
            ),
            (
                "Stand Mixer",
                "5 l bowl, ten speeds, three attachments.",
                29_900,
            ),
            (
                "Scented Candle Trio",
                "Soy wax candles: cedar, fig and sea salt.",
                2_900,
            ),
        ],
    ),
    (
        "books",
        &[
            (
                "The Rust Programming Language",
                "The official book on Rust, in print.",
                3_999,
            ),
            (
                "Designing Data-Intensive Applications",
                "The big ideas behind reliable, scalable systems.",
                4_499,
            ),
            (
                "A Field Guide to Birds",
                "Illustrated guide to 500 species.",
                2_499,
            ),
            (
                "The Quiet Garden",
                "A novel about three generations and one garden.",
                1_699,
            ),
            (
                "Cooking with Fire",
                "Recipes for grill, oven and open flame.",
                2_999,
            ),
            (
                "Mountains of the World",
                "A photographic atlas of 100 peaks.",
                3_499,
            ),
            (
                "Small Habits, Big Change",
                "How tiny routines add up.",
                1_899,
            ),
            (
                "Stars Tonight",
                "A beginner's guide to the night sky.",
                1_999,
            ),
        ],
    ),
    (
        "clothing",
        &[
            (
                "Merino Crew Sweater",
                "Fine-knit merino wool, regular fit.",
                8_900,
            ),
            (
                "Organic Cotton T-Shirt",
                "Heavyweight tee in organic cotton.",
                2_500,
            ),
            (
                "Selvedge Denim Jeans",
                "Straight-leg jeans in 14 oz selvedge denim.",
                12_900,
            ),
            (
                "Waterproof Shell Jacket",
                "Three-layer breathable rain jacket.",
                19_900,
            ),
            ("Wool Beanie", "Rib-knit beanie, one size.", 2_900),
            (
                "Canvas Sneakers",
                "Low-top sneakers with a vulcanised sole.",
                6_500,
            ),
            ("Linen Shirt", "Relaxed-fit shirt in washed linen.", 5_900),
            ("Down Vest", "Lightweight 700-fill down vest.", 11_900),
        ],
    ),
    (
        "sports-outdoors",
        &[
            (
                "Trail Running Shoes",
                "Grippy, cushioned shoes for rough trails.",
                13_900,
            ),
            (
                "Yoga Mat Pro",
                "6 mm non-slip mat with a carry strap.",
                4_999,
            ),
            (
                "Two-Person Tent",
                "Freestanding backpacking tent, 1.9 kg.",
                24_900,
            ),
            ("Insulated Water Bottle", "750 ml, keeps cold 24 h.", 2_999),
            ("Adjustable Dumbbells", "Pair, 2 to 24 kg each.", 29_900),
            ("Cycling Helmet", "Lightweight helmet with MIPS.", 8_900),
            (
                "Hiking Daypack 25 l",
                "Ventilated back panel and rain cover.",
                7_900,
            ),
            (
                "Camping Stove",
                "Compact gas stove with piezo ignition.",
                4_500,
            ),
        ],
    ),
    (
        "toys-games",
        &[
            (
                "Wooden Train Set",
                "48 pieces of beech track and trains.",
                5_900,
            ),
            (
                "Strategy Board Game",
                "Build, trade and settle; 3 to 4 players.",
                3_999,
            ),
            ("1000-Piece Puzzle", "Alpine lake panorama.", 1_999),
            ("Building Bricks Box", "500 bricks in 20 colours.", 3_499),
            ("Remote Control Car", "1:18 off-road buggy, 25 km/h.", 5_499),
            ("Plush Fox", "Soft toy fox, 30 cm.", 1_999),
            (
                "Card Game Classics",
                "Six classic card games in one box.",
                1_499,
            ),
            ("Science Kit", "30 experiments for curious kids.", 3_299),
            ("Kite Rainbow", "Easy-flying delta kite.", 2_499),
            (
                "Chess Set Walnut",
                "Weighted pieces and a folding board.",
                6_900,
            ),
            ("Marble Run", "120-piece marble run with a lift.", 4_900),
        ],
    ),
];

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SeedReport {
    pub categories_created: usize,
    pub products_created: usize,
    pub products_total: usize,
}

/// Seeds the demo catalog through the service's own create paths (so every product emits its
/// `product.created` event).
pub async fn seed_demo(products: &Products) -> Result<SeedReport, ServiceError> {
    let mut report = SeedReport::default();
    let existing = products.list_categories().await?;
    let mut ids: HashMap<String, String> = existing
        .iter()
        .map(|c| (c.slug.clone(), c.id.clone()))
        .collect();
    for (slug, name, parent) in CATEGORIES {
        if ids.contains_key(*slug) {
            continue;
        }
        let parent_id = parent.and_then(|p| ids.get(p).cloned()).unwrap_or_default();
        let c = products
            .create_category(CreateCategoryRequest {
                name: (*name).to_owned(),
                slug: (*slug).to_owned(),
                parent_id,
            })
            .await?;
        ids.insert(c.slug, c.id);
        report.categories_created += 1;
    }
    let currency = products.config().default_currency.clone();
    let mut n = 0u32;
    for (cat, items) in PRODUCTS {
        for (name, description, price) in *items {
            n += 1;
            report.products_total += 1;
            let sku = format!("SV-{n:04}");
            if products.by_sku(&sku).await?.is_some() {
                continue;
            }
            let mut attributes = std::collections::HashMap::new();
            attributes.insert(
                "brand".to_owned(),
                ["Northwind", "Acme", "Lumen", "Fjord"][n as usize % 4].to_owned(),
            );
            products
                .create_product(CreateProductRequest {
                    sku: sku.clone(),
                    name: (*name).to_owned(),
                    description: (*description).to_owned(),
                    price: Some(Money {
                        amount_minor: *price,
                        currency: currency.clone(),
                    }),
                    category_id: ids.get(*cat).cloned().unwrap_or_default(),
                    attributes,
                    image_urls: vec![format!(
                        "https://images.shopverse.example/{}.jpg",
                        sku.to_lowercase()
                    )],
                    initial_stock: 20 + i64::from(n * 37 % 180),
                })
                .await?;
            report.products_created += 1;
        }
    }
    Ok(report)
}
