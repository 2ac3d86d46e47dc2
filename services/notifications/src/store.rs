//! All of the notifications service's SQL (SQLite or PostgreSQL, same statements).

use sqlx::{AnyConnection, Row};

use shopverse_kit::clock::to_timestamp;
use shopverse_proto::notifications::v1::Notification;
use shopverse_storage::Db;

/// Whether `channel` already sent event `event_id`.
pub async fn delivered(db: &Db, event_id: &str, channel: &str) -> Result<bool, sqlx::Error> {
    let s: Option<String> =
        sqlx::query_scalar("SELECT status FROM deliveries WHERE event_id = $1 AND channel = $2")
            .bind(event_id)
            .bind(channel)
            .fetch_optional(&mut *db.read().await?)
            .await?;
    Ok(s.as_deref() == Some("SENT"))
}

/// Records one send of `event_id` on `channel`: sent, or failed with `error`.
pub async fn record_send(
    db: &Db,
    event_id: &str,
    channel: &str,
    recipient: &str,
    error: Option<&str>,
    now: i64,
) -> Result<(), sqlx::Error> {
    let q = sqlx::query(
        "INSERT INTO deliveries (event_id, channel, recipient, status, attempts, last_error, updated_at) \
         VALUES ($1, $2, $3, $4, 1, $5, $6) \
         ON CONFLICT (event_id, channel) DO UPDATE SET status = excluded.status, \
         attempts = deliveries.attempts + 1, last_error = excluded.last_error, updated_at = excluded.updated_at",
    )
    .bind(event_id)
    .bind(channel)
    .bind(recipient)
    .bind(if error.is_some() { "FAILED" } else { "SENT" })
    .bind(error.unwrap_or_default())
    .bind(now);
    let mut conn = db.write_conn().await?;
    q.execute(&mut *conn).await?;
    Ok(())
}

/// The email address `user.registered` told for `user_id`.
pub async fn contact_email(db: &Db, user_id: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT email FROM contacts WHERE user_id = $1")
        .bind(user_id)
        .fetch_optional(&mut *db.read().await?)
        .await
}

pub async fn upsert_contact(
    conn: &mut AnyConnection,
    user_id: &str,
    email: &str,
    display_name: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO contacts (user_id, email, display_name) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, display_name = excluded.display_name",
    )
    .bind(user_id)
    .bind(email)
    .bind(display_name)
    .execute(conn)
    .await?;
    Ok(())
}

/// One in-app item per event (a redelivery adds nothing).
pub struct NewItem<'a> {
    pub user_id: &'a str,
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    pub created_at: i64,
}

pub async fn insert_item(conn: &mut AnyConnection, item: &NewItem<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO inbox_items (id, user_id, event_id, event_type, subject, body, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(item.user_id)
    .bind(item.event_id)
    .bind(item.event_type)
    .bind(item.subject)
    .bind(item.body)
    .bind(item.created_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Up to `limit` items of `user_id`, newest first, older than the item `before` (empty: from
/// the newest).
pub async fn list_items(
    db: &Db,
    user_id: &str,
    before: &str,
    limit: i64,
) -> Result<Vec<Notification>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, event_type, subject, body, created_at FROM inbox_items \
         WHERE user_id = $1 AND ($2 = '' OR id < $2) ORDER BY id DESC LIMIT $3",
    )
    .bind(user_id)
    .bind(before)
    .bind(limit)
    .fetch_all(&mut *db.read().await?)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Notification {
                id: row.try_get("id")?,
                event_type: row.try_get("event_type")?,
                subject: row.try_get("subject")?,
                body: row.try_get("body")?,
                created_at: Some(to_timestamp(row.try_get("created_at")?)),
            })
        })
        .collect()
}
