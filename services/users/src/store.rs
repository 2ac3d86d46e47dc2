//! The users database. Every query runs unchanged on SQLite and PostgreSQL.

use sqlx::{AnyConnection, Row};

use shopverse_kit::ServiceError;
use shopverse_proto::common::v1::Address;
use shopverse_storage::Db;

#[derive(Debug, Clone)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub password_hash: String,
    pub display_name: String,
    pub roles: Vec<String>,
    pub addresses: Vec<Address>,
    pub created_at: i64,
    pub updated_at: i64,
}

use shopverse_kit::validate::{addresses_from_json, addresses_to_json};

const USER_COLUMNS: &str =
    "id, email, password_hash, display_name, roles, addresses, created_at, updated_at";

fn user_from_row(row: &sqlx::any::AnyRow) -> Result<UserRow, sqlx::Error> {
    let roles: String = row.try_get("roles")?;
    Ok(UserRow {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        password_hash: row.try_get("password_hash")?,
        display_name: row.try_get("display_name")?,
        roles: roles
            .split(',')
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect(),
        addresses: addresses_from_json(&row.try_get::<String, _>("addresses")?),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

#[derive(Clone)]
pub struct Repo {
    pub db: Db,
}

impl Repo {
    pub async fn user_by_email(
        &self,
        conn: &mut AnyConnection,
        email: &str,
    ) -> Result<Option<UserRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {USER_COLUMNS} FROM users WHERE email = $1"));
        sqlx::query(sql)
            .bind(email)
            .fetch_optional(conn)
            .await?
            .map(|r| user_from_row(&r))
            .transpose()
    }

    pub async fn user_by_id(
        &self,
        conn: &mut AnyConnection,
        id: &str,
    ) -> Result<Option<UserRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"));
        sqlx::query(sql)
            .bind(id)
            .fetch_optional(conn)
            .await?
            .map(|r| user_from_row(&r))
            .transpose()
    }

    /// A page of users in id order (UUIDv7: sign-up order) after `after`.
    pub async fn list_users(
        &self,
        after: &str,
        email: Option<&str>,
        limit: i64,
    ) -> Result<Vec<UserRow>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {USER_COLUMNS} FROM users WHERE id > $1 AND ($2 = '' OR email = $2) ORDER BY id LIMIT $3"
        ));
        let rows = sqlx::query(sql)
            .bind(after)
            .bind(email.unwrap_or_default())
            .bind(limit)
            .fetch_all(&mut *self.db.read().await?)
            .await?;
        rows.iter().map(user_from_row).collect()
    }

    pub async fn insert_user(
        &self,
        conn: &mut AnyConnection,
        u: &UserRow,
    ) -> Result<(), ServiceError> {
        let res = sqlx::query(
            "INSERT INTO users (id, email, password_hash, display_name, roles, addresses, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&u.id)
        .bind(&u.email)
        .bind(&u.password_hash)
        .bind(&u.display_name)
        .bind(u.roles.join(","))
        .bind(addresses_to_json(&u.addresses))
        .bind(u.created_at)
        .bind(u.updated_at)
        .execute(conn)
        .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if shopverse_storage::is_unique_violation(&e) => Err(
                ServiceError::AlreadyExists("an account with this email already exists".into()),
            ),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn update_profile(
        &self,
        conn: &mut AnyConnection,
        u: &UserRow,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE users SET display_name = $1, addresses = $2, roles = $3, updated_at = $4 WHERE id = $5")
            .bind(&u.display_name)
            .bind(addresses_to_json(&u.addresses))
            .bind(u.roles.join(","))
            .bind(u.updated_at)
            .bind(&u.id)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// `Some(locked_until_ms)` when sign-ins for `email` are locked at `now`.
    pub async fn login_locked(&self, email: &str, now: i64) -> Result<Option<i64>, sqlx::Error> {
        let until: Option<i64> =
            sqlx::query_scalar("SELECT locked_until FROM login_failures WHERE email = $1")
                .bind(email)
                .fetch_optional(&mut *self.db.read().await?)
                .await?;
        Ok(until.filter(|u| *u > now))
    }

    /// Counts a failed sign-in; the `max`-th failure locks the email until `now + lockout_ms`.
    pub async fn record_login_failure(
        &self,
        email: &str,
        now: i64,
        max: i64,
        lockout_ms: i64,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.db.begin_write().await?;
        sqlx::query(
            "INSERT INTO login_failures (email, failures, locked_until) VALUES ($1, 1, 0) \
             ON CONFLICT (email) DO UPDATE SET failures = login_failures.failures + 1",
        )
        .bind(email)
        .execute(&mut *tx)
        .await?;
        let failures: i64 =
            sqlx::query_scalar("SELECT failures FROM login_failures WHERE email = $1")
                .bind(email)
                .fetch_one(&mut *tx)
                .await?;
        let locked = failures >= max;
        if locked {
            sqlx::query(
                "UPDATE login_failures SET failures = 0, locked_until = $1 WHERE email = $2",
            )
            .bind(now + lockout_ms)
            .bind(email)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(locked)
    }

    pub async fn clear_login_failures(&self, email: &str) -> Result<(), sqlx::Error> {
        let mut conn = self.db.write_conn().await?;
        sqlx::query("DELETE FROM login_failures WHERE email = $1")
            .bind(email)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    pub async fn insert_family(
        &self,
        conn: &mut AnyConnection,
        family: &str,
        user: &str,
        now: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO token_families (id, user_id, created_at) VALUES ($1, $2, $3)")
            .bind(family)
            .bind(user)
            .bind(now)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub async fn insert_refresh(
        &self,
        conn: &mut AnyConnection,
        hash: &str,
        family: &str,
        user: &str,
        now: i64,
        expires: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, family_id, user_id, issued_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(hash)
        .bind(family)
        .bind(user)
        .bind(now)
        .bind(expires)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// `(family, user, expires_at, spent_at, family revoked_at)` of a refresh token.
    pub async fn refresh_token(
        &self,
        conn: &mut AnyConnection,
        hash: &str,
    ) -> Result<Option<(String, String, i64, Option<i64>, Option<i64>)>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT t.family_id, t.user_id, t.expires_at, t.spent_at, f.revoked_at \
             FROM refresh_tokens t JOIN token_families f ON f.id = t.family_id WHERE t.token_hash = $1",
        )
        .bind(hash)
        .fetch_optional(conn)
        .await?;
        row.map(|r| {
            Ok((
                r.try_get("family_id")?,
                r.try_get("user_id")?,
                r.try_get("expires_at")?,
                r.try_get("spent_at")?,
                r.try_get("revoked_at")?,
            ))
        })
        .transpose()
    }

    /// Marks a token spent; false when someone spent it first.
    pub async fn spend_refresh(
        &self,
        conn: &mut AnyConnection,
        hash: &str,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let n = sqlx::query(
            "UPDATE refresh_tokens SET spent_at = $1 WHERE token_hash = $2 AND spent_at IS NULL",
        )
        .bind(now)
        .bind(hash)
        .execute(conn)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    pub async fn revoke_family(
        &self,
        conn: &mut AnyConnection,
        family: &str,
        now: i64,
        reason: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE token_families SET revoked_at = $1, revoked_reason = $2 WHERE id = $3 AND revoked_at IS NULL")
            .bind(now)
            .bind(reason)
            .bind(family)
            .execute(conn)
            .await?;
        Ok(())
    }
}
