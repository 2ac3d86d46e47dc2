//! The products database. Every query runs unchanged on SQLite and PostgreSQL.

use std::collections::BTreeMap;

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use shopverse_storage::Db;
use shopverse_storage::placeholders;

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

pub struct ListQuery<'a> {
    /// Only these categories (a category and its descendants); `None`: all.
    pub categories: Option<&'a [String]>,
    /// Lowercased text to find in name or description.
    pub text: Option<&'a str>,
    pub include_archived: bool,
    pub sort: Sort,
    /// Start after this (key, id).
    pub after: Option<(CursorKey, String)>,
    pub limit: i64,
}

/// Escapes `%`, `_` and `\` for a LIKE pattern with `ESCAPE '\'`.
fn like_pattern(text: &str) -> String {
    let mut p = String::with_capacity(text.len() + 2);
    p.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
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
        enum Arg<'a> {
            Int(i64),
            Text(&'a str),
            Owned(String),
        }
        let mut clauses: Vec<String> = Vec::new();
        let mut args: Vec<Arg<'_>> = Vec::new();
        let next = |args: &mut Vec<Arg<'_>>| format!("${}", args.len());
        if !q.include_archived {
            clauses.push("active = 1".into());
        }
        if let Some(cats) = q.categories {
            let mut ph = Vec::new();
            for c in cats {
                args.push(Arg::Text(c));
                ph.push(next(&mut args));
            }
            if ph.is_empty() {
                return Ok(Vec::new());
            }
            clauses.push(format!("category_id IN ({})", ph.join(", ")));
        }
        if let Some(text) = q.text {
            args.push(Arg::Owned(like_pattern(text)));
            clauses.push(format!("search_text LIKE {} ESCAPE '\\'", next(&mut args)));
        }
        let (col, desc) = (q.sort.column(), q.sort.descending());
        let cmp = if desc { "<" } else { ">" };
        if let Some((key, id)) = &q.after {
            args.push(match key {
                CursorKey::Int(i) => Arg::Int(*i),
                CursorKey::Text(s) => Arg::Text(s),
            });
            let k = next(&mut args);
            args.push(Arg::Text(id));
            let i = next(&mut args);
            clauses.push(format!(
                "({col} {cmp} {k} OR ({col} = {k} AND id {cmp} {i}))"
            ));
        }
        args.push(Arg::Int(q.limit));
        let limit = next(&mut args);
        let dir = if desc { "DESC" } else { "ASC" };
        let filter = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let sql = format!(
            "SELECT {PRODUCT_COLUMNS} FROM products {filter} ORDER BY {col} {dir}, id {dir} LIMIT {limit}"
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for a in args {
            query = match a {
                Arg::Int(i) => query.bind(i),
                Arg::Text(s) => query.bind(s.to_owned()),
                Arg::Owned(s) => query.bind(s),
            };
        }
        let rows = query.fetch_all(&mut *self.db.read().await?).await?;
        rows.iter().map(product_from_row).collect()
    }

    pub async fn insert_product(
        &self,
        conn: &mut AnyConnection,
        p: &ProductRow,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO products (id, sku, name, description, price_minor, currency, category_id, attributes, \
             image_urls, active, version, search_text, sort_name, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&p.id)
        .bind(&p.sku)
        .bind(&p.name)
        .bind(&p.description)
        .bind(p.price_minor)
        .bind(&p.currency)
        .bind(p.category_id.as_deref())
        .bind(serde_json::to_string(&p.attributes).unwrap_or_else(|_| "{}".into()))
        .bind(serde_json::to_string(&p.image_urls).unwrap_or_else(|_| "[]".into()))
        .bind(i64::from(p.active))
        .bind(p.version)
        .bind(format!("{}\n{}", p.name, p.description).to_lowercase())
        .bind(p.name.to_lowercase())
        .bind(p.created_at)
        .bind(p.updated_at)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Writes `p` if the stored version is still `expected`; false when someone got there first.
    pub async fn update_product(
        &self,
        conn: &mut AnyConnection,
        p: &ProductRow,
        expected: i64,
    ) -> Result<bool, sqlx::Error> {
        let n = sqlx::query(
            "UPDATE products SET name = $1, description = $2, price_minor = $3, currency = $4, category_id = $5, \
             attributes = $6, image_urls = $7, active = $8, version = $9, search_text = $10, sort_name = $11, \
             updated_at = $12 WHERE id = $13 AND version = $14",
        )
        .bind(&p.name)
        .bind(&p.description)
        .bind(p.price_minor)
        .bind(&p.currency)
        .bind(p.category_id.as_deref())
        .bind(serde_json::to_string(&p.attributes).unwrap_or_else(|_| "{}".into()))
        .bind(serde_json::to_string(&p.image_urls).unwrap_or_else(|_| "[]".into()))
        .bind(i64::from(p.active))
        .bind(p.version)
        .bind(format!("{}\n{}", p.name, p.description).to_lowercase())
        .bind(p.name.to_lowercase())
        .bind(p.updated_at)
        .bind(&p.id)
        .bind(expected)
        .execute(conn)
        .await?
        .rows_affected();
        Ok(n == 1)
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
