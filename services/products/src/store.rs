//! The products database. Every query runs unchanged on SQLite and PostgreSQL.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use shopverse_storage::placeholders;
use shopverse_storage::{Db, DbKind};

use crate::search::{self, Query, Scope};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CategoryRow {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub parent_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductRow {
    pub id: String,
    pub sku: String,
    pub name: String,
    pub description: String,
    pub price_minor: i64,
    pub currency: String,
    pub category_id: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub image_urls: Vec<String>,
    pub active: bool,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StockRow {
    pub available: i64,
    pub reserved: i64,
}

fn stock_from_row(r: &sqlx::any::AnyRow) -> Result<StockRow, sqlx::Error> {
    Ok(StockRow {
        available: r.try_get("available")?,
        reserved: r.try_get("reserved")?,
    })
}

const PRODUCT_COLUMNS: &str = "id, sku, name, description, price_minor, currency, category_id, attributes, \
     image_urls, active, version, created_at, updated_at";

/// The columns an edit may change, in [`bind_editable`]'s order.
const EDITABLE_COLUMNS: [&str; 13] = [
    "name",
    "description",
    "price_minor",
    "currency",
    "category_id",
    "attributes",
    "image_urls",
    "active",
    "version",
    "search_text",
    "sort_name",
    "updated_at",
    "search_name",
];

/// `p`'s values of [`EDITABLE_COLUMNS`], its indexed words included.
fn bind_editable<'q>(q: AnyQuery<'q>, p: &ProductRow) -> AnyQuery<'q> {
    let (search_name, search_text) = indexed_words(p);
    q.bind(p.name.clone())
        .bind(p.description.clone())
        .bind(p.price_minor)
        .bind(p.currency.clone())
        .bind(p.category_id.clone())
        .bind(serde_json::to_string(&p.attributes).unwrap_or_else(|_| "{}".into()))
        .bind(serde_json::to_string(&p.image_urls).unwrap_or_else(|_| "[]".into()))
        .bind(i64::from(p.active))
        .bind(p.version)
        .bind(search_text)
        .bind(p.name.to_lowercase())
        .bind(p.updated_at)
        .bind(search_name)
}

/// A new product's row: `INSERT INTO products (…) VALUES …` for `rows` products, bound by
/// [`bind_new`] (`doc` is left to the database).
fn insert_products_sql(rows: usize) -> String {
    format!(
        "INSERT INTO products (id, sku, created_at, {}) VALUES {}",
        EDITABLE_COLUMNS.join(", "),
        placeholders(1, rows, 3 + EDITABLE_COLUMNS.len())
    )
}

fn bind_new<'q>(q: AnyQuery<'q>, p: &ProductRow) -> AnyQuery<'q> {
    bind_editable(
        q.bind(p.id.clone()).bind(p.sku.clone()).bind(p.created_at),
        p,
    )
}

/// The attribute rows of `products` (values lowercased, for filters), in few statements.
async fn insert_attribute_rows(
    conn: &mut AnyConnection,
    products: &[ProductRow],
) -> Result<(), sqlx::Error> {
    let rows: Vec<(&str, &str, String)> = products
        .iter()
        .flat_map(|p| {
            p.attributes
                .iter()
                .map(|(k, v)| (p.id.as_str(), k.as_str(), v.trim().to_lowercase()))
        })
        .collect();
    for chunk in rows.chunks(1_000) {
        let sql = format!(
            "INSERT INTO product_attributes (product_id, name, value) VALUES {}",
            placeholders(1, chunk.len(), 3)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (id, k, v) in chunk {
            q = q.bind(*id).bind(*k).bind(v.clone());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Adds `n` to the kept count of each `(category, band)` cell.
async fn add_facet_cells(
    conn: &mut AnyConnection,
    cells: &BTreeMap<(String, i64), i64>,
) -> Result<(), sqlx::Error> {
    let cells: Vec<_> = cells.iter().collect();
    for chunk in cells.chunks(1_000) {
        let sql = format!(
            "INSERT INTO catalog_facets (category_id, price_band, products) VALUES {} \
             ON CONFLICT (category_id, price_band) DO UPDATE SET products = catalog_facets.products + excluded.products",
            placeholders(1, chunk.len(), 3)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for ((c, b), n) in chunk {
            q = q.bind(c.clone()).bind(*b).bind(**n);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Per word: how many more products hold it, and how many more in their name.
type TermDeltas = BTreeMap<String, (i64, i64)>;

/// Adds the deltas to the vocabulary's counts, and forgets words no product holds any more.
async fn add_terms(conn: &mut AnyConnection, terms: &TermDeltas) -> Result<(), sqlx::Error> {
    let terms: Vec<_> = terms.iter().filter(|(_, d)| **d != (0, 0)).collect();
    for chunk in terms.chunks(1_000) {
        let sql = format!(
            "INSERT INTO search_terms (term, products, in_names) VALUES {} \
             ON CONFLICT (term) DO UPDATE SET products = search_terms.products + excluded.products, \
             in_names = search_terms.in_names + excluded.in_names",
            placeholders(1, chunk.len(), 3)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (t, (n, in_names)) in chunk {
            q = q.bind((*t).clone()).bind(*n).bind(*in_names);
        }
        q.execute(&mut *conn).await?;
        let gone: Vec<&&String> = chunk
            .iter()
            .filter(|(_, (n, _))| *n < 0)
            .map(|(t, _)| t)
            .collect();
        if !gone.is_empty() {
            let sql = format!(
                "DELETE FROM search_terms WHERE products <= 0 AND term IN {}",
                placeholders(1, 1, gone.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for t in gone {
                q = q.bind((*t).clone());
            }
            q.execute(&mut *conn).await?;
        }
    }
    Ok(())
}

fn product_from_row(r: &sqlx::any::AnyRow) -> Result<ProductRow, sqlx::Error> {
    Ok(ProductRow {
        id: r.try_get("id")?,
        sku: r.try_get("sku")?,
        name: r.try_get("name")?,
        description: r.try_get("description")?,
        price_minor: r.try_get("price_minor")?,
        currency: r.try_get("currency")?,
        category_id: r.try_get("category_id")?,
        attributes: serde_json::from_str(&r.try_get::<String, _>("attributes")?)
            .unwrap_or_default(),
        image_urls: serde_json::from_str(&r.try_get::<String, _>("image_urls")?)
            .unwrap_or_default(),
        active: r.try_get::<i64, _>("active")? != 0,
        version: r.try_get("version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// Sort orders, each with its keyset: the column compared and the direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    Newest,
    PriceAsc,
    PriceDesc,
    NameAsc,
}

impl Sort {
    fn column(self) -> &'static str {
        match self {
            Sort::Newest => "created_at",
            Sort::PriceAsc | Sort::PriceDesc => "price_minor",
            Sort::NameAsc => "sort_name",
        }
    }
    fn descending(self) -> bool {
        matches!(self, Sort::Newest | Sort::PriceDesc)
    }
    /// The cursor key of `p` for this order.
    pub fn key_of(self, p: &ProductRow) -> CursorKey {
        match self {
            Sort::Newest => CursorKey::Int(p.created_at),
            Sort::PriceAsc | Sort::PriceDesc => CursorKey::Int(p.price_minor),
            Sort::NameAsc => CursorKey::Text(p.name.to_lowercase()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum CursorKey {
    Int(i64),
    Text(String),
}

/// What a list or a search selects, besides its order.
#[derive(Default, Clone)]
pub struct Filter<'a> {
    /// Only these categories (a category and its descendants); `None`: all.
    pub categories: Option<&'a [String]>,
    pub include_archived: bool,
    /// Inclusive price bounds, minor units.
    pub min_price: Option<i64>,
    pub max_price: Option<i64>,
    /// `(name, lowercased value)` pairs a product must all have.
    pub attributes: &'a [(String, String)],
    /// Only products matching these words, in this scope.
    pub matching: Option<(&'a Query, Scope)>,
    /// The categories hold a large share of the catalog: SQLite walks the sort order's index
    /// and skips other categories' products, rather than collecting every product of the
    /// categories and sorting them (a department of 12,500 products took 18.7 ms that way,
    /// its first page 0.2 ms this way). SQLite keeps no statistics to choose by itself.
    pub categories_are_broad: bool,
}

pub struct ListQuery<'a> {
    pub filter: Filter<'a>,
    pub sort: Sort,
    /// Start after this (key, id).
    pub after: Option<(CursorKey, String)>,
    pub limit: i64,
}

/// A statement's arguments, numbered as they are pushed.
#[derive(Default)]
struct Args(Vec<Arg>);

enum Arg {
    Int(i64),
    Text(String),
}

impl Args {
    fn push(&mut self, a: Arg) -> String {
        self.0.push(a);
        format!("${}", self.0.len())
    }
    fn int(&mut self, i: i64) -> String {
        self.push(Arg::Int(i))
    }
    fn text(&mut self, s: impl Into<String>) -> String {
        self.push(Arg::Text(s.into()))
    }
    fn bind<'q>(self, mut q: AnyQuery<'q>) -> AnyQuery<'q> {
        for a in self.0 {
            q = match a {
                Arg::Int(i) => q.bind(i),
                Arg::Text(s) => q.bind(s),
            };
        }
        q
    }
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// A statement with a text match: on PostgreSQL planned for its own words each time, not from
/// a plan cached for the statement (which, made for no words in particular, may walk a whole
/// index for a rare word); SQLite's FTS5 plans the same whatever the words.
fn planned_per_call(q: AnyQuery<'_>, kind: DbKind) -> AnyQuery<'_> {
    q.persistent(kind == DbKind::Sqlite)
}

impl Filter<'_> {
    /// The filter's conditions on `products p`, joined by `AND` (`TRUE` when none); `None`
    /// when nothing can match (an empty category list). The text match is left out when
    /// `with_match` is false (the caller joins the index itself).
    fn conditions(&self, kind: DbKind, args: &mut Args, with_match: bool) -> Option<String> {
        let mut c: Vec<String> = Vec::new();
        if !self.include_archived {
            c.push("p.active = 1".into());
        }
        if let Some(cats) = self.categories {
            if cats.is_empty() {
                return None;
            }
            let ph: Vec<String> = cats.iter().map(|id| args.text(id.as_str())).collect();
            // A unary `+` keeps SQLite from using the column's index for the condition.
            let plus = if self.categories_are_broad && kind == DbKind::Sqlite {
                "+"
            } else {
                ""
            };
            c.push(format!("{plus}p.category_id IN ({})", ph.join(", ")));
        }
        if let Some(min) = self.min_price {
            c.push(format!("p.price_minor >= {}", args.int(min)));
        }
        if let Some(max) = self.max_price {
            c.push(format!("p.price_minor <= {}", args.int(max)));
        }
        for (name, value) in self.attributes {
            let (n, v) = (args.text(name.as_str()), args.text(value.as_str()));
            c.push(format!(
                "EXISTS (SELECT 1 FROM product_attributes a WHERE a.product_id = p.id AND a.name = {n} AND a.value = {v})"
            ));
        }
        if with_match && let Some((q, scope)) = self.matching {
            c.push(match kind {
                DbKind::Sqlite => {
                    let table = fts_table(scope);
                    format!(
                        "p.doc IN (SELECT rowid FROM {table} WHERE {table} MATCH {})",
                        args.text(q.fts5(scope))
                    )
                }
                DbKind::Postgres => pg_match(q, scope, args),
            });
        }
        Some(if c.is_empty() {
            "TRUE".into()
        } else {
            c.join(" AND ")
        })
    }
}

/// SQLite's FTS5 table for `scope`: the names' own, or every word's.
fn fts_table(scope: Scope) -> &'static str {
    match scope {
        Scope::Name => "products_name_fts",
        Scope::All | Scope::Rest => "products_fts",
    }
}

/// PostgreSQL's condition for `q` in `scope` on `products p`.
fn pg_match(q: &Query, scope: Scope, args: &mut Args) -> String {
    pg_condition(q, scope, args, |vec, tsq| format!("p.{vec} @@ {tsq}"))
}

/// The same condition in a form no index serves (the function behind `@@`): each product is
/// tested as the newest-first walk reaches it.
fn pg_match_walking(q: &Query, scope: Scope, args: &mut Args) -> String {
    pg_condition(q, scope, args, |vec, tsq| {
        format!("ts_match_vq(p.{vec}, {tsq})")
    })
}

fn pg_condition(
    q: &Query,
    scope: Scope,
    args: &mut Args,
    test: impl Fn(&str, &str) -> String,
) -> String {
    let tsq = format!("to_tsquery('simple', {})", args.text(q.tsquery()));
    let (all, name) = (test("search_vec", &tsq), test("name_vec", &tsq));
    match scope {
        Scope::All => all,
        Scope::Name => name,
        Scope::Rest => format!("{all} AND NOT {name}"),
    }
}

/// A product as search ranks it: its index number and its indexed words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub doc: i64,
    pub search_name: String,
    pub search_text: String,
}

/// The indexed words of `p`: `(search_name, search_text)`.
pub fn indexed_words(p: &ProductRow) -> (String, String) {
    (
        search::normalize(&p.name),
        search::body_text(&p.description, p.attributes.values().map(String::as_str)),
    )
}

/// Adds what a product counts for, times `sign`, to the facet cells and the vocabulary: while
/// it is active, its `(category, band)` cell and its words.
fn tally(
    p: Option<&ProductRow>,
    sign: i64,
    cells: &mut BTreeMap<(String, i64), i64>,
    terms: &mut TermDeltas,
) {
    let Some(p) = p.filter(|p| p.active) else {
        return;
    };
    let cell = (
        p.category_id.clone().unwrap_or_default(),
        search::price_band(p.price_minor),
    );
    *cells.entry(cell).or_default() += sign;
    let (name, text) = indexed_words(p);
    for (w, in_name) in search::vocabulary(&name, &text) {
        let d = terms.entry(w).or_default();
        d.0 += sign;
        d.1 += sign * i64::from(in_name);
    }
}

#[derive(Clone)]
pub struct Repo {
    pub db: Db,
}

impl Repo {
    pub async fn count_products(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM products")
            .fetch_one(&mut *self.db.read().await?)
            .await
    }

    pub async fn categories(&self) -> Result<Vec<CategoryRow>, sqlx::Error> {
        let rows =
            sqlx::query("SELECT id, name, slug, parent_id FROM categories ORDER BY name, id")
                .fetch_all(&mut *self.db.read().await?)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(CategoryRow {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    slug: r.try_get("slug")?,
                    parent_id: r.try_get("parent_id")?,
                })
            })
            .collect()
    }

    pub async fn insert_category(&self, c: &CategoryRow, now: i64) -> Result<(), sqlx::Error> {
        let q = sqlx::query("INSERT INTO categories (id, name, slug, parent_id, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&c.id)
            .bind(&c.name)
            .bind(&c.slug)
            .bind(c.parent_id.as_deref())
            .bind(now);
        let mut conn = self.db.write_conn().await?;
        q.execute(&mut *conn).await?;
        Ok(())
    }

    pub async fn product(
        &self,
        conn: &mut AnyConnection,
        id: &str,
    ) -> Result<Option<ProductRow>, sqlx::Error> {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(|r| product_from_row(&r))
        .transpose()
    }

    /// The highest SKU from `low` to `high` (inclusive), if any.
    pub async fn max_sku_between(
        &self,
        low: &str,
        high: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT MAX(sku) FROM products WHERE sku >= $1 AND sku <= $2")
            .bind(low)
            .bind(high)
            .fetch_one(&mut *self.db.read().await?)
            .await
    }

    pub async fn product_by_sku(&self, sku: &str) -> Result<Option<ProductRow>, sqlx::Error> {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT {PRODUCT_COLUMNS} FROM products WHERE sku = $1"
        )))
        .bind(sku)
        .fetch_optional(&mut *self.db.read().await?)
        .await?
        .map(|r| product_from_row(&r))
        .transpose()
    }

    pub async fn list(&self, q: &ListQuery<'_>) -> Result<Vec<ProductRow>, sqlx::Error> {
        let mut args = Args::default();
        let Some(filter) = q.filter.conditions(self.db.kind(), &mut args, true) else {
            return Ok(Vec::new());
        };
        let (col, desc) = (q.sort.column(), q.sort.descending());
        let cmp = if desc { "<" } else { ">" };
        let mut keyset = String::new();
        if let Some((key, id)) = &q.after {
            let k = match key {
                CursorKey::Int(i) => args.int(*i),
                CursorKey::Text(s) => args.text(s.as_str()),
            };
            let i = args.text(id.as_str());
            keyset = format!(" AND (p.{col} {cmp} {k} OR (p.{col} = {k} AND p.id {cmp} {i}))");
        }
        let limit = args.int(q.limit);
        let dir = if desc { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT {PRODUCT_COLUMNS} FROM products p WHERE {filter}{keyset} \
             ORDER BY p.{col} {dir}, p.id {dir} LIMIT {limit}"
        );
        let mut stmt = args.bind(sqlx::query(AssertSqlSafe(sql)));
        if q.filter.matching.is_some() {
            stmt = planned_per_call(stmt, self.db.kind());
        }
        let rows = stmt.fetch_all(&mut *self.db.read().await?).await?;
        rows.iter().map(product_from_row).collect()
    }

    /// The newest products (highest `doc` first) at or below `at_most` that match `query` in
    /// `scope` and pass `filter`, with their indexed words; at most `limit`.
    pub async fn matches(
        &self,
        filter: &Filter<'_>,
        query: &Query,
        scope: Scope,
        at_most: i64,
        limit: i64,
    ) -> Result<Vec<Candidate>, sqlx::Error> {
        let kind = self.db.kind();
        let mut args = Args::default();
        // SQLite: the index drives, newest first, and each match is looked up by `doc`.
        let expr = (kind == DbKind::Sqlite).then(|| args.text(query.fts5(scope)));
        let Some(conds) = filter.conditions(kind, &mut args, false) else {
            return Ok(Vec::new());
        };
        let top = args.int(at_most);
        let sql = match expr {
            Some(expr) => {
                let t = fts_table(scope);
                format!(
                    "SELECT p.doc, p.search_name, p.search_text FROM {t} \
                     JOIN products p ON p.doc = {t}.rowid \
                     WHERE {t} MATCH {expr} AND {t}.rowid <= {top} AND {conds} \
                     ORDER BY {t}.rowid DESC LIMIT {}",
                    args.int(limit)
                )
            }
            None => {
                // PostgreSQL's GIN index yields matches in no order: few matches are best read
                // from it and sorted, many by walking the newest-first index and testing each
                // (the function form of `@@` is not indexable). The planner guesses badly for
                // words it has no statistics for, so the vocabulary's estimate decides. Reading
                // a match from the index costs about 11 us, testing a product on the walk 1.3 us
                // (at 1M products), so the two meet near sqrt(limit x catalog / 8.5) matches.
                let (m, order) = match query.expected {
                    Some((all, names)) => {
                        let e = match scope {
                            Scope::All => all,
                            Scope::Name => names,
                            Scope::Rest => (all - names).max(0.0),
                        };
                        if e <= ((limit.max(1) * at_most.max(1)) as f64 / 8.5).sqrt() {
                            (pg_match(query, scope, &mut args), "p.doc + 0")
                        } else {
                            (pg_match_walking(query, scope, &mut args), "p.doc")
                        }
                    }
                    None => (pg_match(query, scope, &mut args), "p.doc"),
                };
                format!(
                    "SELECT p.doc, p.search_name, p.search_text FROM products p \
                     WHERE {m} AND p.doc <= {top} AND {conds} ORDER BY {order} DESC LIMIT {}",
                    args.int(limit)
                )
            }
        };
        let rows = planned_per_call(args.bind(sqlx::query(AssertSqlSafe(sql))), kind)
            .fetch_all(&mut *self.db.read().await?)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Candidate {
                    doc: r.try_get("doc")?,
                    search_name: r
                        .try_get::<Option<String>, _>("search_name")?
                        .unwrap_or_default(),
                    search_text: r.try_get("search_text")?,
                })
            })
            .collect()
    }

    /// The products numbered `docs`, in that order (ones since gone are left out).
    pub async fn by_docs(&self, docs: &[i64]) -> Result<Vec<ProductRow>, sqlx::Error> {
        if docs.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT doc, {PRODUCT_COLUMNS} FROM products WHERE doc IN {}",
            placeholders(1, 1, docs.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for d in docs {
            q = q.bind(*d);
        }
        let rows = q.fetch_all(&mut *self.db.read().await?).await?;
        let mut found: BTreeMap<i64, ProductRow> = BTreeMap::new();
        for r in &rows {
            found.insert(r.try_get("doc")?, product_from_row(r)?);
        }
        Ok(docs.iter().filter_map(|d| found.remove(d)).collect())
    }

    /// The highest `doc` yet (0 for an empty catalog): a search's pages stay below it.
    pub async fn max_doc(&self) -> Result<i64, sqlx::Error> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(doc) FROM products")
            .fetch_one(&mut *self.db.read().await?)
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// Whether any product matches `query` (in the index alone: archived ones count).
    pub async fn any_match(&self, query: &Query) -> Result<bool, sqlx::Error> {
        let mut args = Args::default();
        let sql = match self.db.kind() {
            DbKind::Sqlite => format!(
                "SELECT rowid FROM products_fts WHERE products_fts MATCH {} LIMIT 1",
                args.text(query.fts5(Scope::All))
            ),
            DbKind::Postgres => format!(
                "SELECT p.doc FROM products p WHERE {} LIMIT 1",
                pg_match(query, Scope::All, &mut args)
            ),
        };
        let row = planned_per_call(args.bind(sqlx::query(AssertSqlSafe(sql))), self.db.kind())
            .fetch_optional(&mut *self.db.read().await?)
            .await?;
        Ok(row.is_some())
    }

    /// `(category id or '', price band, products)` of the products `filter` selects, counted
    /// over the matching rows.
    pub async fn facet_cells(
        &self,
        filter: &Filter<'_>,
    ) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
        let mut args = Args::default();
        let Some(conds) = filter.conditions(self.db.kind(), &mut args, true) else {
            return Ok(Vec::new());
        };
        let mut band = String::from("CASE");
        for (i, upper) in search::PRICE_BANDS.iter().enumerate() {
            band.push_str(&format!(" WHEN p.price_minor < {upper} THEN {i}"));
        }
        band.push_str(&format!(" ELSE {} END", search::PRICE_BANDS.len()));
        let sql = format!(
            "SELECT COALESCE(p.category_id, '') AS c, {band} AS b, COUNT(*) AS n \
             FROM products p WHERE {conds} GROUP BY 1, 2"
        );
        let mut stmt = args.bind(sqlx::query(AssertSqlSafe(sql)));
        if filter.matching.is_some() {
            stmt = planned_per_call(stmt, self.db.kind());
        }
        let rows = stmt.fetch_all(&mut *self.db.read().await?).await?;
        rows.iter()
            .map(|r| Ok((r.try_get("c")?, r.try_get("b")?, r.try_get("n")?)))
            .collect()
    }

    /// The same cells for every active product, from the counts product writes keep.
    pub async fn facet_cells_kept(&self) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT category_id, price_band, products FROM catalog_facets WHERE products > 0",
        )
        .fetch_all(&mut *self.db.read().await?)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("category_id")?,
                    r.try_get("price_band")?,
                    r.try_get("products")?,
                ))
            })
            .collect()
    }

    /// How many active products hold each of `words` (words no product holds are left out).
    pub async fn term_counts(
        &self,
        words: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, i64>, sqlx::Error> {
        Ok(self
            .term_stats(words)
            .await?
            .into_iter()
            .map(|(w, (n, _))| (w, n))
            .collect())
    }

    /// How many active products hold each of `words`, and how many in their name (words no
    /// product holds are left out). The words go as one parameter, space-separated (a word
    /// has no spaces): a statement of hundreds of parameters cost PostgreSQL more to parse
    /// and plan than to run.
    pub async fn term_stats(
        &self,
        words: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, (i64, i64)>, sqlx::Error> {
        let list = match self.db.kind() {
            DbKind::Sqlite => "(SELECT value FROM json_each($1))",
            DbKind::Postgres => "(SELECT unnest(string_to_array($1, ' ')))",
        };
        let joined = match self.db.kind() {
            DbKind::Sqlite => serde_json::to_string(words).unwrap_or_else(|_| "[]".into()),
            DbKind::Postgres => words.iter().cloned().collect::<Vec<_>>().join(" "),
        };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT term, products, in_names FROM search_terms WHERE products > 0 AND term IN {list}"
        )))
        .bind(joined)
        .fetch_all(&mut *self.db.read().await?)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("term")?,
                    (r.try_get("products")?, r.try_get("in_names")?),
                ))
            })
            .collect()
    }

    /// Refreshes PostgreSQL's statistics of the catalog's tables, after a bulk load: its
    /// planner chooses between the text index and the newest-first walk by them. (SQLite
    /// keeps none; its plans do not depend on them.)
    pub async fn analyze(&self) -> Result<(), sqlx::Error> {
        if self.db.kind() == DbKind::Postgres {
            let mut conn = self.db.write_conn().await?;
            for t in ["products", "product_attributes", "search_terms", "stock"] {
                sqlx::query(AssertSqlSafe(format!("ANALYZE {t}")))
                    .execute(&mut *conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// Up to `limit` words of active products that start with `prefix`, in order.
    pub async fn completions(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT term FROM search_terms WHERE term >= $1 AND term < $2 AND products > 0 \
             ORDER BY term LIMIT $3",
        )
        .bind(prefix)
        .bind(format!("{prefix}\u{10FFFF}"))
        .bind(limit as i64)
        .fetch_all(&mut *self.db.read().await?)
        .await
    }

    /// Keeps the service's own indexes (attribute rows, facet counts, vocabulary) in step with
    /// a product going from `old` to `new` (`None`: not there), in the caller's transaction.
    pub async fn reindex(
        &self,
        conn: &mut AnyConnection,
        old: Option<&ProductRow>,
        new: &ProductRow,
    ) -> Result<(), sqlx::Error> {
        if old.is_none_or(|o| o.attributes != new.attributes) {
            if old.is_some() {
                sqlx::query("DELETE FROM product_attributes WHERE product_id = $1")
                    .bind(&new.id)
                    .execute(&mut *conn)
                    .await?;
            }
            insert_attribute_rows(conn, std::slice::from_ref(new)).await?;
        }
        let mut cells: BTreeMap<(String, i64), i64> = BTreeMap::new();
        let mut terms = TermDeltas::new();
        tally(old, -1, &mut cells, &mut terms);
        tally(Some(new), 1, &mut cells, &mut terms);
        cells.retain(|_, n| *n != 0);
        add_facet_cells(conn, &cells).await?;
        add_terms(conn, &terms).await
    }

    /// Products written before search existed (`search_name` unset), up to `limit`.
    pub async fn unindexed(&self, limit: i64) -> Result<Vec<ProductRow>, sqlx::Error> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {PRODUCT_COLUMNS} FROM products WHERE search_name IS NULL LIMIT $1"
        )))
        .bind(limit)
        .fetch_all(&mut *self.db.read().await?)
        .await?;
        rows.iter().map(product_from_row).collect()
    }

    /// Indexes a product [`Repo::unindexed`] returned: its words, attribute rows and
    /// vocabulary. Its facet cell was counted by the migration.
    pub async fn index_unindexed(
        &self,
        conn: &mut AnyConnection,
        p: &ProductRow,
    ) -> Result<(), sqlx::Error> {
        let (name, text) = indexed_words(p);
        sqlx::query("UPDATE products SET search_name = $1, search_text = $2 WHERE id = $3")
            .bind(&name)
            .bind(&text)
            .bind(&p.id)
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM product_attributes WHERE product_id = $1")
            .bind(&p.id)
            .execute(&mut *conn)
            .await?;
        insert_attribute_rows(conn, std::slice::from_ref(p)).await?;
        let mut terms = TermDeltas::new();
        tally(Some(p), 1, &mut BTreeMap::new(), &mut terms);
        add_terms(conn, &terms).await
    }

    /// Inserts many new products with their stock in a few statements, and counts them into
    /// the facets and the vocabulary: the bulk seed's path.
    pub async fn insert_products_bulk(
        &self,
        conn: &mut AnyConnection,
        rows: &[(ProductRow, i64)],
    ) -> Result<(), sqlx::Error> {
        // 16,000 parameters: under both dialects' limits on a statement's.
        for chunk in rows.chunks(1_000) {
            let mut q = sqlx::query(AssertSqlSafe(insert_products_sql(chunk.len())));
            for (p, _) in chunk {
                q = bind_new(q, p);
            }
            q.execute(&mut *conn).await?;
            let sql = format!(
                "INSERT INTO stock (product_id, available, reserved) VALUES {}",
                placeholders(1, chunk.len(), 3)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (p, available) in chunk {
                q = q.bind(&p.id).bind(*available).bind(0_i64);
            }
            q.execute(&mut *conn).await?;
        }
        let products: Vec<ProductRow> = rows.iter().map(|(p, _)| p.clone()).collect();
        insert_attribute_rows(conn, &products).await?;
        let mut cells: BTreeMap<(String, i64), i64> = BTreeMap::new();
        let mut terms = TermDeltas::new();
        for p in &products {
            tally(Some(p), 1, &mut cells, &mut terms);
        }
        add_facet_cells(conn, &cells).await?;
        add_terms(conn, &terms).await
    }

    pub async fn insert_product(
        &self,
        conn: &mut AnyConnection,
        p: &ProductRow,
    ) -> Result<(), sqlx::Error> {
        bind_new(sqlx::query(AssertSqlSafe(insert_products_sql(1))), p)
            .execute(&mut *conn)
            .await?;
        self.reindex(conn, None, p).await
    }

    /// Writes `p` if the stored version is still `expected`; false when someone got there
    /// first. `old` is the product as read in this transaction.
    pub async fn update_product(
        &self,
        conn: &mut AnyConnection,
        old: &ProductRow,
        p: &ProductRow,
        expected: i64,
    ) -> Result<bool, sqlx::Error> {
        let n = EDITABLE_COLUMNS.len();
        let set: Vec<String> = EDITABLE_COLUMNS
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = ${}", i + 1))
            .collect();
        let sql = format!(
            "UPDATE products SET {} WHERE id = ${} AND version = ${}",
            set.join(", "),
            n + 1,
            n + 2
        );
        let changed = bind_editable(sqlx::query(AssertSqlSafe(sql)), p)
            .bind(p.id.clone())
            .bind(expected)
            .execute(&mut *conn)
            .await?
            .rows_affected();
        if changed != 1 {
            return Ok(false);
        }
        self.reindex(conn, Some(old), p).await?;
        Ok(true)
    }

    pub async fn stock(
        &self,
        conn: &mut AnyConnection,
        product_id: &str,
    ) -> Result<Option<StockRow>, sqlx::Error> {
        let row = sqlx::query("SELECT available, reserved FROM stock WHERE product_id = $1")
            .bind(product_id)
            .fetch_optional(conn)
            .await?;
        row.as_ref().map(stock_from_row).transpose()
    }

    pub async fn insert_stock(
        &self,
        conn: &mut AnyConnection,
        product_id: &str,
        available: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO stock (product_id, available, reserved) VALUES ($1, $2, 0)")
            .bind(product_id)
            .bind(available)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub async fn set_available(
        &self,
        conn: &mut AnyConnection,
        product_id: &str,
        available: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE stock SET available = $1 WHERE product_id = $2")
            .bind(available)
            .bind(product_id)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Moves `qty` of an active product from available to reserved if that many are
    /// available, and returns the stock after; `None` (nothing changed) when the product is
    /// missing, archived, or short.
    pub async fn take(
        &self,
        conn: &mut AnyConnection,
        product_id: &str,
        qty: i64,
    ) -> Result<Option<StockRow>, sqlx::Error> {
        let row = sqlx::query(
            "UPDATE stock SET available = available - $1, reserved = reserved + $1 \
             WHERE product_id = $2 AND available >= $1 \
             AND EXISTS (SELECT 1 FROM products WHERE id = $2 AND active <> 0) \
             RETURNING available, reserved",
        )
        .bind(qty)
        .bind(product_id)
        .fetch_optional(conn)
        .await?;
        row.as_ref().map(stock_from_row).transpose()
    }

    /// Applies a reservation's end to stock: `reserved -= from_reserved`, `available +=
    /// to_available`; returns the stock after (`None` for a product without stock).
    pub async fn settle(
        &self,
        conn: &mut AnyConnection,
        product_id: &str,
        from_reserved: i64,
        to_available: i64,
    ) -> Result<Option<StockRow>, sqlx::Error> {
        let row = sqlx::query(
            "UPDATE stock SET reserved = reserved - $1, available = available + $2 \
             WHERE product_id = $3 RETURNING available, reserved",
        )
        .bind(from_reserved)
        .bind(to_available)
        .bind(product_id)
        .fetch_optional(conn)
        .await?;
        row.as_ref().map(stock_from_row).transpose()
    }

    /// `(state, lines)` of an order's reservation.
    pub async fn reservation(
        &self,
        conn: &mut AnyConnection,
        order_id: &str,
    ) -> Result<Option<(String, Vec<(String, i64)>)>, sqlx::Error> {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = $1")
                .bind(order_id)
                .fetch_optional(&mut *conn)
                .await?;
        let Some(state) = state else {
            return Ok(None);
        };
        let rows = sqlx::query("SELECT product_id, quantity FROM reservation_lines WHERE order_id = $1 ORDER BY product_id")
            .bind(order_id)
            .fetch_all(conn)
            .await?;
        let lines = rows
            .iter()
            .map(|r| Ok((r.try_get("product_id")?, r.try_get("quantity")?)))
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(Some((state, lines)))
    }

    pub async fn insert_reservation(
        &self,
        conn: &mut AnyConnection,
        order_id: &str,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO reservations (order_id, state, created_at, updated_at) VALUES ($1, 'HELD', $2, $2)")
            .bind(order_id)
            .bind(now)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// An order's reservation lines, in one statement.
    pub async fn insert_reservation_lines(
        &self,
        conn: &mut AnyConnection,
        order_id: &str,
        lines: &[(String, i64)],
    ) -> Result<(), sqlx::Error> {
        if lines.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO reservation_lines (order_id, product_id, quantity) VALUES {}",
            placeholders(1, lines.len(), 3)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (product_id, qty) in lines {
            q = q.bind(order_id).bind(product_id).bind(*qty);
        }
        q.execute(conn).await?;
        Ok(())
    }

    pub async fn set_reservation_state(
        &self,
        conn: &mut AnyConnection,
        order_id: &str,
        state: &str,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE reservations SET state = $1, updated_at = $2 WHERE order_id = $3")
            .bind(state)
            .bind(now)
            .bind(order_id)
            .execute(conn)
            .await?;
        Ok(())
    }
}
