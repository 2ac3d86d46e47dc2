//! A synthetic catalog of any size (`shopverse seed --products N`), for measuring search and
//! browsing at scale: 8 departments of 4 categories, products named from a brand, an
//! adjective, a colour, a product word of their category and a model code, described in two
//! sentences from a few hundred words, with brand, colour and size attributes.
//!
//! Product `i` is the same on every run (SKU `BK` and `i` in 8 digits), so seeding tops up:
//! asking for 1,000,000 after 100,000 adds the other 900,000, and an interrupted run goes on
//! where it stopped. Products are written in batches of 2,000 per transaction through
//! [`Repo::insert_products_bulk`], with their stock, facet counts and vocabulary, but without
//! catalog events: a running gateway's edge cache learns of them as entries expire.

use std::collections::HashMap;

use shopverse_kit::ServiceError;
use shopverse_proto::products::v1::CreateCategoryRequest;

use crate::app::Products;
use crate::store::ProductRow;

/// Products per transaction.
const BATCH: usize = 2_000;
/// The SKU prefix of synthetic products.
const SKU_PREFIX: &str = "BK";

/// `(category, product words)`
type Category = (&'static str, &'static [&'static str]);

/// `(department, categories)`
const TREE: &[(&str, &[Category])] = &[
    (
        "Audio & Video",
        &[
            (
                "Headphones",
                &["headphones", "earbuds", "headset", "earphones"],
            ),
            ("Speakers", &["speaker", "soundbar", "subwoofer", "boombox"]),
            ("Cameras", &["camera", "camcorder", "lens", "tripod"]),
            (
                "Televisions",
                &["television", "projector", "monitor", "display"],
            ),
        ],
    ),
    (
        "Computing",
        &[
            (
                "Laptops",
                &["laptop", "notebook", "ultrabook", "chromebook"],
            ),
            ("Peripherals", &["keyboard", "mouse", "trackpad", "webcam"]),
            ("Storage", &["drive", "memory", "enclosure", "backup"]),
            ("Networking", &["router", "switch", "repeater", "modem"]),
        ],
    ),
    (
        "Home",
        &[
            ("Kitchen", &["kettle", "blender", "toaster", "skillet"]),
            ("Lighting", &["lamp", "lantern", "chandelier", "sconce"]),
            ("Bedding", &["pillow", "duvet", "blanket", "mattress"]),
            ("Furniture", &["chair", "table", "bookcase", "cabinet"]),
        ],
    ),
    (
        "Clothing",
        &[
            ("Outerwear", &["jacket", "parka", "raincoat", "vest"]),
            ("Tops", &["shirt", "sweater", "hoodie", "blouse"]),
            ("Footwear", &["sneakers", "boots", "sandals", "loafers"]),
            ("Accessories", &["scarf", "gloves", "beanie", "wallet"]),
        ],
    ),
    (
        "Sports",
        &[
            ("Cycling", &["bicycle", "helmet", "saddle", "pedals"]),
            ("Camping", &["tent", "sleeping bag", "stove", "backpack"]),
            (
                "Fitness",
                &["dumbbell", "treadmill", "kettlebell", "yoga mat"],
            ),
            ("Water Sports", &["paddle", "kayak", "wetsuit", "snorkel"]),
        ],
    ),
    (
        "Toys",
        &[
            (
                "Building",
                &["bricks", "blocks", "construction set", "marble run"],
            ),
            ("Puzzles", &["puzzle", "jigsaw", "brainteaser", "cube"]),
            (
                "Outdoor Play",
                &["kite", "frisbee", "scooter", "trampoline"],
            ),
            (
                "Games",
                &["board game", "card game", "chess set", "dominoes"],
            ),
        ],
    ),
    (
        "Books",
        &[
            ("Fiction", &["novel", "thriller", "anthology", "romance"]),
            (
                "Cooking",
                &[
                    "cookbook",
                    "baking guide",
                    "recipe collection",
                    "grill manual",
                ],
            ),
            (
                "Travel",
                &["travel guide", "atlas", "phrasebook", "road map"],
            ),
            (
                "Science",
                &["textbook", "field guide", "encyclopedia", "workbook"],
            ),
        ],
    ),
    (
        "Garden",
        &[
            ("Tools", &["shovel", "pruner", "rake", "trowel"]),
            (
                "Planters",
                &["planter", "flowerpot", "raised bed", "trellis"],
            ),
            ("Watering", &["hose", "sprinkler", "watering can", "nozzle"]),
            (
                "Outdoor Living",
                &["hammock", "parasol", "bench", "firepit"],
            ),
        ],
    ),
];

const BRANDS: &[&str] = &[
    "Northwind",
    "Acme",
    "Lumen",
    "Fjord",
    "Aurora",
    "Boreal",
    "Cobalt",
    "Dune",
    "Ember",
    "Fable",
    "Granite",
    "Harbor",
    "Indigo",
    "Juniper",
    "Kestrel",
    "Lark",
    "Meridian",
    "Nimbus",
    "Onyx",
    "Pioneer",
    "Quarry",
    "Ridge",
    "Summit",
    "Tundra",
    "Umber",
    "Vertex",
    "Willow",
    "Yonder",
    "Zephyr",
    "Alder",
    "Basalt",
    "Cedar",
    "Delta",
    "Echo",
    "Falcon",
    "Glacier",
    "Hollow",
    "Iris",
    "Jasper",
    "Kodiak",
    "Lagoon",
    "Maple",
    "Nova",
    "Orchid",
    "Prairie",
    "Quill",
    "Raven",
    "Sierra",
    "Timber",
    "Vista",
];

const ADJECTIVES: &[&str] = &[
    "classic",
    "compact",
    "deluxe",
    "ergonomic",
    "foldable",
    "heavy-duty",
    "lightweight",
    "modern",
    "portable",
    "premium",
    "rugged",
    "slim",
    "smart",
    "sturdy",
    "vintage",
    "wireless",
    "waterproof",
    "quiet",
    "cordless",
    "handmade",
    "organic",
    "insulated",
    "adjustable",
    "reversible",
    "stackable",
    "rechargeable",
    "magnetic",
    "breathable",
    "padded",
    "modular",
];

const COLOURS: &[&str] = &[
    "black", "white", "grey", "navy", "red", "green", "blue", "yellow", "orange", "purple", "teal",
    "olive", "charcoal", "ivory", "sand", "coral", "burgundy", "silver", "bronze", "copper",
];

const SIZES: &[&str] = &["XS", "S", "M", "L", "XL", "one size"];

const OPENINGS: &[&str] = &[
    "Built for everyday use",
    "Designed in Scandinavia",
    "Made to last",
    "Our best seller",
    "New this season",
    "Tested by our team",
    "Loved by reviewers",
    "Crafted with care",
];

const FEATURES: &[&str] = &[
    "recycled materials",
    "a two year warranty",
    "free returns",
    "a soft-touch finish",
    "reinforced stitching",
    "a detachable strap",
    "fast charging",
    "long battery life",
    "a carrying case",
    "replaceable parts",
    "tool-free assembly",
    "a matte coating",
    "stainless steel fittings",
    "a non-slip base",
    "an anodised frame",
    "a spare set of tips",
    "machine washable covers",
    "an energy saving mode",
    "bluetooth pairing",
    "a travel pouch",
    "ceramic bearings",
    "an aluminium body",
    "a walnut veneer",
    "a lifetime guarantee",
    "noise cancelling",
    "a memory foam core",
    "a quick release clamp",
    "a titanium shell",
    "an oak handle",
    "a braided cable",
];

const USES: &[&str] = &[
    "the home office",
    "weekend trips",
    "small apartments",
    "busy kitchens",
    "long commutes",
    "family holidays",
    "outdoor adventures",
    "gifting",
    "beginners",
    "professionals",
    "rainy days",
    "the garden shed",
    "students",
    "the gym",
    "night owls",
    "early risers",
];

/// A deterministic stream of numbers for product `i` (SplitMix64).
struct Dice(u64);

impl Dice {
    fn of(i: u64) -> Dice {
        Dice(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[(self.next() % of.len() as u64) as usize]
    }
}

/// The SKU of synthetic product `i`.
pub fn sku(i: u64) -> String {
    format!("{SKU_PREFIX}{i:08}")
}

/// Every category slug of the synthetic tree with `(name, parent slug)`, parents first.
fn categories() -> Vec<(String, String, Option<String>)> {
    let mut out = Vec::new();
    for (dept, cats) in TREE {
        let d = format!("bulk-{}", crate::domain::slugify(dept));
        out.push((d.clone(), (*dept).to_owned(), None));
        for (cat, _) in *cats {
            let slug = format!("{d}-{}", crate::domain::slugify(cat));
            out.push((slug, (*cat).to_owned(), Some(d.clone())));
        }
    }
    out
}

/// Synthetic product `i`: `(category slug, name, description, price, attributes, stock)`.
type Synthetic = (String, String, String, i64, Vec<(String, String)>, i64);

fn product(i: u64) -> Synthetic {
    let mut d = Dice::of(i);
    let dept = (d.next() % TREE.len() as u64) as usize;
    let (dept_name, cats) = TREE[dept];
    let (cat_name, words) = cats[(d.next() % cats.len() as u64) as usize];
    let slug = format!(
        "bulk-{}-{}",
        crate::domain::slugify(dept_name),
        crate::domain::slugify(cat_name)
    );
    let brand = d.pick(BRANDS);
    let adjective = d.pick(ADJECTIVES);
    let colour = d.pick(COLOURS);
    let noun = d.pick(words);
    let model = format!(
        "{}{}",
        (b'A' + (d.next() % 26) as u8) as char,
        100 + d.next() % 900
    );
    let name = format!("{brand} {} {colour} {noun} {model}", capitalise(adjective));
    let description = format!(
        "{}: a {adjective} {noun} in {colour} with {} and {}. Ideal for {}.",
        d.pick(OPENINGS),
        d.pick(FEATURES),
        d.pick(FEATURES),
        d.pick(USES),
    );
    // Prices spread over the bands: 1.00 to about 2,000.00, more of them cheap.
    let price = 100 + ((d.next() % 1_000) * (d.next() % 1_000) / 5) as i64;
    let attributes = vec![
        ("brand".to_owned(), brand.to_owned()),
        ("colour".to_owned(), colour.to_owned()),
        ("size".to_owned(), d.pick(SIZES).to_owned()),
    ];
    let stock = (d.next() % 500) as i64;
    (slug, name, description, price, attributes, stock)
}

fn capitalise(w: &str) -> String {
    let mut c = w.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// What [`seed_products`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BulkReport {
    /// Synthetic products there were before.
    pub existing: u64,
    pub created: u64,
}

/// Makes sure synthetic products `0..total` exist, adding the missing ones in batches;
/// `progress(done, to_do)` after each batch.
pub async fn seed_products(
    products: &Products,
    total: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<BulkReport, ServiceError> {
    products.index_catalog().await?;
    let existing = match products
        .repo()
        .max_sku_between(&sku(0), &sku(99_999_999))
        .await?
    {
        Some(last) => last[SKU_PREFIX.len()..].parse::<u64>().map_or(0, |n| n + 1),
        None => 0,
    };
    let mut report = BulkReport {
        existing,
        created: 0,
    };
    if existing >= total {
        return Ok(report);
    }
    let mut ids: HashMap<String, String> = products
        .list_categories()
        .await?
        .into_iter()
        .map(|c| (c.slug, c.id))
        .collect();
    for (slug, name, parent) in categories() {
        if ids.contains_key(&slug) {
            continue;
        }
        let c = products
            .create_category(CreateCategoryRequest {
                name,
                slug: slug.clone(),
                parent_id: parent
                    .and_then(|p| ids.get(&p).cloned())
                    .unwrap_or_default(),
            })
            .await?;
        ids.insert(c.slug, c.id);
    }
    let currency = products.config().default_currency.clone();
    let to_do = total - existing;
    progress(0, to_do);
    let mut i = existing;
    while i < total {
        let end = (i + BATCH as u64).min(total);
        let now = products.now();
        let rows: Vec<(ProductRow, i64)> = (i..end)
            .map(|n| {
                let (slug, name, description, price, attributes, stock) = product(n);
                let row = ProductRow {
                    id: uuid::Uuid::now_v7().to_string(),
                    sku: sku(n),
                    name,
                    description,
                    price_minor: price,
                    currency: currency.clone(),
                    category_id: ids.get(&slug).cloned(),
                    attributes: attributes.into_iter().collect(),
                    image_urls: Vec::new(),
                    active: true,
                    version: 1,
                    created_at: now,
                    updated_at: now,
                };
                (row, stock)
            })
            .collect();
        let mut tx = products.repo().db.begin_write().await?;
        products.repo().insert_products_bulk(&mut tx, &rows).await?;
        tx.commit().await?;
        report.created += end - i;
        i = end;
        progress(report.created, to_do);
    }
    products.repo().analyze().await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_are_the_same_every_time_and_varied() {
        assert_eq!(product(7), product(7));
        assert_ne!(product(7).1, product(8).1);
        let slugs: std::collections::HashSet<String> =
            categories().into_iter().map(|c| c.0).collect();
        let mut bands = std::collections::BTreeSet::new();
        for i in 0..2_000 {
            let (slug, name, description, price, attributes, _) = product(i);
            assert!(slugs.contains(&slug), "{slug}");
            assert!(name.split(' ').count() >= 5, "{name}");
            assert!(description.len() > 40);
            assert!(price > 0);
            assert_eq!(attributes.len(), 3);
            bands.insert(crate::search::price_band(price));
        }
        assert_eq!(bands.len(), 8, "every price band is used");
        assert_eq!(sku(42), "BK00000042");
    }
}
