//! The orders database. Every query runs unchanged on SQLite and PostgreSQL.

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use shopverse_kit::validate::{address_from_json, address_to_json};
use shopverse_proto::common::v1::Address;
use shopverse_storage::Db;
use shopverse_storage::placeholders;

use crate::domain::{CheckoutState, MAX_CART_LINES, MAX_LINE_QUANTITY, OrderState};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRow {
    pub product_id: String,
    pub sku: String,
    pub name: String,
    pub unit_price_minor: i64,
    pub quantity: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRow {
    pub id: String,
    pub user_id: String,
    pub status: OrderState,
    pub currency: String,
    pub subtotal_minor: i64,
    pub shipping_minor: i64,
    pub total_minor: i64,
    pub shipping_address: Address,
    pub payment_method_token: String,
    pub paid: bool,
    pub refunded: bool,
    pub cancel_reason: String,
    pub payment_deadline: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub lines: Vec<LineRow>,
}

#[derive(Debug, Clone)]
pub struct CheckoutRow {
    pub request_hash: String,
    pub order_id: String,
    pub state: CheckoutState,
    pub lines: Vec<(String, i64)>,
    pub error: Option<String>,
}

const ORDER_COLUMNS: &str = "id, user_id, status, currency, subtotal_minor, shipping_minor, total_minor, \
     shipping_address, payment_method_token, paid, refunded, cancel_reason, payment_deadline, created_at, updated_at";

fn order_from_row(r: &sqlx::any::AnyRow) -> Result<OrderRow, sqlx::Error> {
    Ok(OrderRow {
        id: r.try_get("id")?,
        user_id: r.try_get("user_id")?,
        status: {
            let s: String = r.try_get("status")?;
            OrderState::parse(&s).ok_or_else(|| {
                sqlx::Error::Decode(
                    format!("order status `{s}` is not one of the state machine's").into(),
                )
            })?
        },
        currency: r.try_get("currency")?,
        subtotal_minor: r.try_get("subtotal_minor")?,
        shipping_minor: r.try_get("shipping_minor")?,
        total_minor: r.try_get("total_minor")?,
        shipping_address: address_from_json(&r.try_get::<String, _>("shipping_address")?),
        payment_method_token: r.try_get("payment_method_token")?,
        paid: r.try_get::<i64, _>("paid")? != 0,
        refunded: r.try_get::<i64, _>("refunded")? != 0,
        cancel_reason: r.try_get("cancel_reason")?,
        payment_deadline: r.try_get("payment_deadline")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        lines: Vec::new(),
    })
}

#[derive(Clone)]
pub struct Store {
    pub db: Db,
}

impl Store {
    pub async fn cart(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
    ) -> Result<Vec<(String, i64)>, sqlx::Error> {
        let rows = sqlx::query("SELECT product_id, quantity FROM cart_lines WHERE user_id = $1 ORDER BY added_at, product_id")
            .bind(user_id)
            .fetch_all(conn)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("product_id")?, r.try_get("quantity")?)))
            .collect()
    }

    pub async fn cart_quantity(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
        product_id: &str,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar("SELECT quantity FROM cart_lines WHERE user_id = $1 AND product_id = $2")
            .bind(user_id)
            .bind(product_id)
            .fetch_optional(conn)
            .await
    }

    /// Adds `qty` units of a product to a cart in one statement: a new line, or more of an
    /// existing one. `Some(quantity now)`, or `None` when the line would hold more than
    /// [`MAX_LINE_QUANTITY`] units or a new line would make more than [`MAX_CART_LINES`]:
    /// nothing is written then.
    pub async fn add_cart_line(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
        product_id: &str,
        qty: i64,
        now: i64,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO cart_lines (user_id, product_id, quantity, added_at) \
             SELECT $1, $2, $3, $4 \
             WHERE $3 <= $5 AND (EXISTS (SELECT 1 FROM cart_lines WHERE user_id = $1 AND product_id = $2) \
                OR (SELECT COUNT(*) FROM cart_lines WHERE user_id = $1) < $6) \
             ON CONFLICT (user_id, product_id) DO UPDATE SET quantity = cart_lines.quantity + excluded.quantity \
             WHERE cart_lines.quantity + excluded.quantity <= $5 \
             RETURNING quantity",
        )
        .bind(user_id)
        .bind(product_id)
        .bind(qty)
        .bind(now)
        .bind(MAX_LINE_QUANTITY)
        .bind(i64::try_from(MAX_CART_LINES).unwrap_or(i64::MAX))
        .fetch_optional(conn)
        .await
    }

    pub async fn set_cart_line(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
        product_id: &str,
        qty: i64,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO cart_lines (user_id, product_id, quantity, added_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (user_id, product_id) DO UPDATE SET quantity = excluded.quantity",
        )
        .bind(user_id)
        .bind(product_id)
        .bind(qty)
        .bind(now)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Removes the cart lines of `product_ids`, in one statement; the count removed.
    pub async fn remove_cart_lines(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
        product_ids: &[&str],
    ) -> Result<u64, sqlx::Error> {
        if product_ids.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "DELETE FROM cart_lines WHERE user_id = $1 AND product_id IN {}",
            placeholders(2, 1, product_ids.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(user_id);
        for id in product_ids {
            q = q.bind(*id);
        }
        Ok(q.execute(conn).await?.rows_affected())
    }

    pub async fn clear_cart(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM cart_lines WHERE user_id = $1")
            .bind(user_id)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub async fn checkout(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
        key: &str,
    ) -> Result<Option<CheckoutRow>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT request_hash, order_id, state, lines, error FROM checkouts WHERE user_id = $1 AND idempotency_key = $2",
        )
        .bind(user_id)
        .bind(key)
        .fetch_optional(conn)
        .await?;
        row.map(|r| {
            Ok(CheckoutRow {
                request_hash: r.try_get("request_hash")?,
                order_id: r.try_get("order_id")?,
                state: {
                    let s: String = r.try_get("state")?;
                    CheckoutState::parse(&s).ok_or_else(|| {
                        sqlx::Error::Decode(format!("checkout state `{s}` is unknown").into())
                    })?
                },
                lines: serde_json::from_str(&r.try_get::<String, _>("lines")?).unwrap_or_default(),
                error: r.try_get("error")?,
            })
        })
        .transpose()
    }

    /// Starts a checkout attempt in state `RESERVING` with the cart's `lines`.
    pub async fn insert_checkout(
        &self,
        conn: &mut AnyConnection,
        user_id: &str,
        key: &str,
        attempt: &CheckoutRow,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO checkouts (user_id, idempotency_key, request_hash, order_id, state, lines, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'RESERVING', $5, $6, $6)",
        )
        .bind(user_id)
        .bind(key)
        .bind(&attempt.request_hash)
        .bind(&attempt.order_id)
        .bind(serde_json::to_string(&attempt.lines).unwrap_or_else(|_| "[]".into()))
        .bind(now)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Moves a checkout from `from` to `to`; false when it was no longer in `from`, or the
    /// move is not one the attempt's states allow.
    pub async fn move_checkout(
        &self,
        conn: &mut AnyConnection,
        order_id: &str,
        from: CheckoutState,
        to: CheckoutState,
        error: Option<&str>,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        if !from.can_become(to) {
            return Ok(false);
        }
        let n = sqlx::query("UPDATE checkouts SET state = $1, error = $2, updated_at = $3 WHERE order_id = $4 AND state = $5")
            .bind(to.as_str())
            .bind(error)
            .bind(now)
            .bind(order_id)
            .bind(from.as_str())
            .execute(conn)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Order ids of checkouts in `state` last touched before `before`.
    pub async fn checkouts_in(
        &self,
        state: CheckoutState,
        before: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT order_id FROM checkouts WHERE state = $1 AND updated_at < $2 ORDER BY created_at LIMIT 100")
            .bind(state.as_str())
            .bind(before)
            .fetch_all(&mut *self.db.read().await?)
            .await
    }

    pub async fn insert_order(
        &self,
        conn: &mut AnyConnection,
        o: &OrderRow,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO orders (id, user_id, status, currency, subtotal_minor, shipping_minor, total_minor, \
             shipping_address, payment_method_token, paid, refunded, cancel_reason, payment_deadline, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&o.id)
        .bind(&o.user_id)
        .bind(o.status.as_str())
        .bind(&o.currency)
        .bind(o.subtotal_minor)
        .bind(o.shipping_minor)
        .bind(o.total_minor)
        .bind(address_to_json(&o.shipping_address))
        .bind(&o.payment_method_token)
        .bind(i64::from(o.paid))
        .bind(i64::from(o.refunded))
        .bind(&o.cancel_reason)
        .bind(o.payment_deadline)
        .bind(o.created_at)
        .bind(o.updated_at)
        .execute(&mut *conn)
        .await?;
        if o.lines.is_empty() {
            return Ok(());
        }
        // Every line in one statement: on SQLite each statement is a hand-off to the
        // connection's thread, made while this file's writer turn is held.
        let sql = format!(
            "INSERT INTO order_lines (order_id, line_no, product_id, sku, name, unit_price_minor, quantity) \
             VALUES {}",
            placeholders(1, o.lines.len(), 7)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (i, l) in o.lines.iter().enumerate() {
            q = q
                .bind(&o.id)
                .bind(i as i64)
                .bind(&l.product_id)
                .bind(&l.sku)
                .bind(&l.name)
                .bind(l.unit_price_minor)
                .bind(l.quantity);
        }
        q.execute(&mut *conn).await?;
        Ok(())
    }

    async fn with_lines(
        &self,
        conn: &mut AnyConnection,
        mut o: OrderRow,
    ) -> Result<OrderRow, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT product_id, sku, name, unit_price_minor, quantity FROM order_lines WHERE order_id = $1 ORDER BY line_no",
        )
        .bind(&o.id)
        .fetch_all(conn)
        .await?;
        o.lines = rows
            .iter()
            .map(|r| {
                Ok(LineRow {
                    product_id: r.try_get("product_id")?,
                    sku: r.try_get("sku")?,
                    name: r.try_get("name")?,
                    unit_price_minor: r.try_get("unit_price_minor")?,
                    quantity: r.try_get("quantity")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(o)
    }

    pub async fn order(
        &self,
        conn: &mut AnyConnection,
        id: &str,
    ) -> Result<Option<OrderRow>, sqlx::Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        match row {
            Some(r) => Ok(Some(self.with_lines(conn, order_from_row(&r)?).await?)),
            None => Ok(None),
        }
    }

    /// A page of orders, newest first (ids are UUIDv7), filtered by owner or status.
    pub async fn list(
        &self,
        user_id: Option<&str>,
        status: Option<OrderState>,
        before_id: &str,
        limit: i64,
    ) -> Result<Vec<OrderRow>, sqlx::Error> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE ($1 = '' OR user_id = $1) AND ($2 = '' OR status = $2) \
             AND ($3 = '' OR id < $3) ORDER BY id DESC LIMIT $4"
        );
        let mut conn = self.db.read().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(user_id.unwrap_or_default())
            .bind(status.map_or("", OrderState::as_str))
            .bind(before_id)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.with_lines(&mut conn, order_from_row(r)?).await?);
        }
        Ok(out)
    }

    /// Ids of orders awaiting payment past their deadline.
    pub async fn overdue(&self, now: i64) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT id FROM orders WHERE status = 'PENDING_PAYMENT' AND payment_deadline < $1 ORDER BY payment_deadline LIMIT 100",
        )
        .bind(now)
        .fetch_all(&mut *self.db.read().await?)
        .await
    }

    /// Writes status and flags of `o` if its status is still `from`; false otherwise.
    pub async fn update_order(
        &self,
        conn: &mut AnyConnection,
        o: &OrderRow,
        from: OrderState,
    ) -> Result<bool, sqlx::Error> {
        let n = sqlx::query(
            "UPDATE orders SET status = $1, paid = $2, refunded = $3, cancel_reason = $4, updated_at = $5 \
             WHERE id = $6 AND status = $7",
        )
        .bind(o.status.as_str())
        .bind(i64::from(o.paid))
        .bind(i64::from(o.refunded))
        .bind(&o.cancel_reason)
        .bind(o.updated_at)
        .bind(&o.id)
        .bind(from.as_str())
        .execute(conn)
        .await?
        .rows_affected();
        Ok(n == 1)
    }
}
