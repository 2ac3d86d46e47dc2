//! The gRPC service `shopverse.users.v1.UsersService`.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Header};
use prometheus::IntCounterVec;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, OnceCell};
use tonic::Request;

use shopverse_events::envelope::{Origin, USER_REGISTERED, new_envelope};
use shopverse_events::outbox::enqueue;
use shopverse_kit::clock::to_timestamp;
use shopverse_kit::identity::Role;
use shopverse_kit::metrics::int_counter_vec;
use shopverse_kit::{Clock, ServiceError};
use shopverse_proto::users::v1::users_service_server::UsersServiceServer;
use shopverse_proto::users::v1::*;
use shopverse_runtime::Platform;
use shopverse_storage::Db;

use crate::config::UsersConfig;
use crate::domain;
use crate::keys::KeyStore;
use crate::store::{Repo, UserRow};

const SOURCE: &str = "users";
const INVALID_LOGIN: &str = "invalid email or password";

/// Claims of an access token.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub roles: Vec<String>,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
}

pub(crate) struct Inner {
    pub(crate) repo: Repo,
    keys: KeyStore,
    pub(crate) config: UsersConfig,
    pub(crate) clock: Arc<dyn Clock>,
    relay_wake: Arc<Notify>,
    /// A hash to verify against when the email is unknown, so both answers take as long.
    dummy_hash: OnceCell<String>,
    logins: IntCounterVec,
    refreshes: IntCounterVec,
}

#[derive(Clone)]
pub struct Users {
    inner: Arc<Inner>,
}

pub(crate) fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn new_refresh_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("svr_{}", URL_SAFE_NO_PAD.encode(bytes))
}

pub(crate) async fn hash_password(pw: String) -> Result<String, ServiceError> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(pw.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| ServiceError::internal("hashing a password", e.to_string()))
    })
    .await
    .map_err(|e| ServiceError::internal("hashing a password", e))?
}

pub(crate) async fn verify_password(pw: String, hash: String) -> Result<bool, ServiceError> {
    tokio::task::spawn_blocking(move || {
        let parsed = PasswordHash::new(&hash)
            .map_err(|e| ServiceError::internal("reading a password hash", e.to_string()))?;
        Ok(Argon2::default()
            .verify_password(pw.as_bytes(), &parsed)
            .is_ok())
    })
    .await
    .map_err(|e| ServiceError::internal("verifying a password", e))?
}

pub fn user_to_proto(u: &UserRow) -> User {
    User {
        id: u.id.clone(),
        email: u.email.clone(),
        display_name: u.display_name.clone(),
        roles: u.roles.clone(),
        addresses: u.addresses.clone(),
        created_at: Some(to_timestamp(u.created_at)),
        updated_at: Some(to_timestamp(u.updated_at)),
    }
}

pub(crate) fn traceparent<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl Users {
    /// The signing keys a verifier should know now: the current one and those retired less
    /// than a token's lifetime ago.
    pub fn published_keys(&self) -> Vec<crate::keys::PublicKey> {
        self.inner
            .keys
            .published(self.now(), self.inner.config.access_ttl_secs)
    }

    pub fn new(
        db: Db,
        keys: KeyStore,
        config: UsersConfig,
        platform: &Platform,
        relay_wake: Arc<Notify>,
    ) -> Users {
        let reg = &platform.registry;
        Users {
            inner: Arc::new(Inner {
                repo: Repo { db },
                keys,
                config,
                clock: platform.clock.clone(),
                relay_wake,
                dummy_hash: OnceCell::new(),
                logins: int_counter_vec(
                    reg,
                    "users_logins_total",
                    "Sign-in attempts by result",
                    &[],
                    &["result"],
                ),
                refreshes: int_counter_vec(
                    reg,
                    "users_refreshes_total",
                    "Token refreshes by result",
                    &[],
                    &["result"],
                ),
            }),
        }
    }

    pub fn into_server(self) -> UsersServiceServer<Users> {
        UsersServiceServer::new(self)
    }

    pub(crate) fn now(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    pub(crate) fn repo(&self) -> &Repo {
        &self.inner.repo
    }

    /// Creates an account (and its `user.registered` event) in one transaction.
    pub async fn create_user(
        &self,
        email: &str,
        password: &str,
        display_name: &str,
        roles: &[Role],
        traceparent: Option<&str>,
    ) -> Result<UserRow, ServiceError> {
        let user = create_user(
            &self.inner.repo,
            self.now(),
            email,
            password,
            display_name,
            roles,
            traceparent,
        )
        .await?;
        self.inner.relay_wake.notify_one();
        Ok(user)
    }

    pub(crate) fn sign_access(&self, user: &UserRow) -> Result<String, ServiceError> {
        let now_s = self.now().div_euclid(1000);
        let claims = Claims {
            iss: self.inner.config.issuer.clone(),
            aud: self.inner.config.audience.clone(),
            sub: user.id.clone(),
            roles: user.roles.clone(),
            iat: now_s,
            nbf: now_s,
            exp: now_s + self.inner.config.access_ttl_secs,
            jti: uuid::Uuid::now_v7().to_string(),
        };
        let (kid, key) = self
            .inner
            .keys
            .active()
            .map_err(|e| ServiceError::internal("loading the signing key", e))?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid);
        jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|e| ServiceError::internal("signing a token", e))
    }

    /// Issues a refresh token in `family` and an access token, inside `conn`'s transaction.
    pub(crate) async fn issue_pair(
        &self,
        conn: &mut sqlx::AnyConnection,
        user: &UserRow,
        family: &str,
    ) -> Result<TokenPair, ServiceError> {
        let now = self.now();
        let refresh = new_refresh_token();
        let ttl = self.inner.config.refresh_ttl_secs;
        self.repo()
            .insert_refresh(
                conn,
                &hash_token(&refresh),
                family,
                &user.id,
                now,
                now + ttl * 1000,
            )
            .await?;
        Ok(TokenPair {
            access_token: self.sign_access(user)?,
            token_type: "Bearer".into(),
            expires_in: self.inner.config.access_ttl_secs,
            refresh_token: refresh,
            refresh_expires_in: ttl,
        })
    }

    pub(crate) async fn dummy_hash(&self) -> Result<String, ServiceError> {
        self.inner
            .dummy_hash
            .get_or_try_init(|| hash_password(URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())))
            .await
            .cloned()
    }

    pub(crate) async fn login(&self, req: LoginRequest) -> Result<TokenPair, ServiceError> {
        let email = domain::normalize_email(&req.email)?;
        let now = self.now();
        let cfg = &self.inner.config;
        if let Some(until) = self.repo().login_locked(&email, now).await? {
            self.inner.logins.with_label_values(&["locked"]).inc();
            let secs = (until - now + 999) / 1000;
            return Err(ServiceError::ResourceExhausted(format!(
                "too many failed sign-in attempts for this account; try again in {secs} s"
            )));
        }
        let mut conn = self.repo().db.read().await?;
        let user = self.repo().user_by_email(&mut conn, &email).await?;
        drop(conn);
        let hash = match &user {
            Some(u) => u.password_hash.clone(),
            None => self.dummy_hash().await?,
        };
        let ok = verify_password(req.password, hash).await? && user.is_some();
        let Some(user) = user.filter(|_| ok) else {
            self.inner.logins.with_label_values(&["failed"]).inc();
            self.repo()
                .record_login_failure(
                    &email,
                    now,
                    cfg.login_max_failures,
                    cfg.login_lockout_secs * 1000,
                )
                .await?;
            return Err(ServiceError::Unauthenticated(INVALID_LOGIN.into()));
        };
        self.repo().clear_login_failures(&email).await?;
        let family = uuid::Uuid::now_v7().to_string();
        let mut tx = self.repo().db.begin_write().await?;
        self.repo()
            .insert_family(&mut tx, &family, &user.id, now)
            .await?;
        let pair = self.issue_pair(&mut tx, &user, &family).await?;
        tx.commit().await?;
        self.inner.logins.with_label_values(&["ok"]).inc();
        Ok(pair)
    }

    pub(crate) async fn refresh(&self, req: RefreshRequest) -> Result<TokenPair, ServiceError> {
        if req.refresh_token.is_empty() {
            return Err(ServiceError::invalid("refresh_token", "is required"));
        }
        let hash = hash_token(&req.refresh_token);
        let now = self.now();
        let invalid = || ServiceError::Unauthenticated("invalid or expired refresh token".into());
        let mut tx = self.repo().db.begin_write().await?;
        let Some((family, user_id, expires, spent, revoked)) =
            self.repo().refresh_token(&mut tx, &hash).await?
        else {
            self.inner.refreshes.with_label_values(&["unknown"]).inc();
            return Err(invalid());
        };
        if revoked.is_some() {
            self.inner.refreshes.with_label_values(&["revoked"]).inc();
            return Err(invalid());
        }
        if spent.is_some() || !self.repo().spend_refresh(&mut tx, &hash, now).await? {
            // A spent token presented again: it was stolen or replayed. Revoke every token of
            // this login, the legitimate holder's included, and make them sign in again.
            self.repo()
                .revoke_family(&mut tx, &family, now, "refresh token reuse")
                .await?;
            tx.commit().await?;
            self.inner.refreshes.with_label_values(&["reuse"]).inc();
            tracing::warn!(%family, user = %user_id, "refresh token reuse; family revoked");
            return Err(ServiceError::Unauthenticated(
                "refresh token already used; this session has been revoked, sign in again".into(),
            ));
        }
        if expires <= now {
            self.inner.refreshes.with_label_values(&["expired"]).inc();
            return Err(invalid());
        }
        let user = self
            .repo()
            .user_by_id(&mut tx, &user_id)
            .await?
            .ok_or_else(invalid)?;
        let pair = self.issue_pair(&mut tx, &user, &family).await?;
        tx.commit().await?;
        self.inner.refreshes.with_label_values(&["ok"]).inc();
        Ok(pair)
    }

    pub(crate) async fn logout(&self, req: LogoutRequest) -> Result<LogoutResponse, ServiceError> {
        if req.refresh_token.is_empty() {
            return Err(ServiceError::invalid("refresh_token", "is required"));
        }
        let mut tx = self.repo().db.begin_write().await?;
        if let Some((family, ..)) = self
            .repo()
            .refresh_token(&mut tx, &hash_token(&req.refresh_token))
            .await?
        {
            self.repo()
                .revoke_family(&mut tx, &family, self.now(), "logout")
                .await?;
        }
        tx.commit().await?;
        // Logging out with an unknown token is not an error: the session is gone either way.
        Ok(LogoutResponse {})
    }

    pub(crate) async fn me(&self, user_id: &str) -> Result<UserRow, ServiceError> {
        let mut conn = self.repo().db.read().await?;
        self.repo()
            .user_by_id(&mut conn, user_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("user", user_id))
    }

    pub(crate) async fn update_me(
        &self,
        user_id: &str,
        req: UpdateMeRequest,
    ) -> Result<UserRow, ServiceError> {
        let addresses = req
            .addresses
            .as_ref()
            .map(|a| domain::addresses(&a.addresses))
            .transpose()?;
        let mut tx = self.repo().db.begin_write().await?;
        let mut user = self
            .repo()
            .user_by_id(&mut tx, user_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("user", user_id))?;
        if let Some(name) = req.display_name {
            if name.trim().is_empty() {
                return Err(ServiceError::invalid("display_name", "must not be empty"));
            }
            user.display_name = domain::display_name(&name, &user.email)?;
        }
        if let Some(a) = addresses {
            user.addresses = a;
        }
        user.updated_at = self.now();
        self.repo().update_profile(&mut tx, &user).await?;
        tx.commit().await?;
        Ok(user)
    }

    pub(crate) async fn set_roles(
        &self,
        caller: &str,
        req: SetRolesRequest,
    ) -> Result<UserRow, ServiceError> {
        if req.user_id.is_empty() {
            return Err(ServiceError::invalid("user_id", "is required"));
        }
        let mut roles: Vec<String> = Vec::new();
        for r in &req.roles {
            let role = Role::parse(r).ok_or_else(|| {
                ServiceError::invalid(
                    "roles",
                    format!("unknown role `{r}`; roles are customer and admin"),
                )
            })?;
            if !roles.iter().any(|x| x == role.as_str()) {
                roles.push(role.as_str().to_owned());
            }
        }
        if roles.is_empty() {
            return Err(ServiceError::invalid(
                "roles",
                "at least one role is required",
            ));
        }
        if req.user_id == caller && !roles.iter().any(|r| r == "admin") {
            return Err(ServiceError::FailedPrecondition(
                "admins cannot remove their own admin role; ask another admin".into(),
            ));
        }
        let mut tx = self.repo().db.begin_write().await?;
        let mut user = self
            .repo()
            .user_by_id(&mut tx, &req.user_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("user", &req.user_id))?;
        user.roles = roles;
        user.updated_at = self.now();
        self.repo().update_profile(&mut tx, &user).await?;
        tx.commit().await?;
        Ok(user)
    }

    pub(crate) async fn list_users(
        &self,
        req: ListUsersRequest,
    ) -> Result<ListUsersResponse, ServiceError> {
        let page = shopverse_kit::paging::Page::parse(req.page_size, &req.page_token, 50, 200)?;
        let email = if req.email.is_empty() {
            None
        } else {
            Some(domain::normalize_email(&req.email)?)
        };
        let mut rows = self
            .repo()
            .list_users(&page.cursor, email.as_deref(), page.fetch())
            .await?;
        let next_page_token = page.finish(&mut rows, |u| &u.id);
        Ok(ListUsersResponse {
            users: rows.iter().map(user_to_proto).collect(),
            next_page_token,
        })
    }
}

/// Creates an account with `roles` and its `user.registered` event, in one transaction.
pub async fn create_user(
    repo: &Repo,
    now: i64,
    email: &str,
    password: &str,
    display_name: &str,
    roles: &[Role],
    traceparent: Option<&str>,
) -> Result<UserRow, ServiceError> {
    let email = domain::normalize_email(email)?;
    domain::check_password(password)?;
    let display_name = domain::display_name(display_name, &email)?;
    let password_hash = hash_password(password.to_owned()).await?;
    let user = UserRow {
        id: uuid::Uuid::now_v7().to_string(),
        email,
        password_hash,
        display_name,
        roles: roles.iter().map(|r| r.as_str().to_owned()).collect(),
        addresses: Vec::new(),
        created_at: now,
        updated_at: now,
    };
    let mut tx = repo.db.begin_write().await?;
    repo.insert_user(&mut tx, &user).await?;
    let payload = UserRegistered {
        user_id: user.id.clone(),
        email: user.email.clone(),
        display_name: user.display_name.clone(),
    };
    let env = new_envelope(
        &USER_REGISTERED,
        SOURCE,
        &user.id,
        now,
        Origin::Request { traceparent },
        &payload,
    );
    enqueue(&mut tx, &USER_REGISTERED, &env).await?;
    tx.commit().await?;
    Ok(user)
}

/// `shopverse admin create`: makes `email` an admin, creating the account if it does not exist.
/// Returns the user and whether it was created.
pub async fn create_admin(
    db: &Db,
    clock: &dyn Clock,
    email: &str,
    password: &str,
) -> Result<(UserRow, bool), ServiceError> {
    let repo = Repo { db: db.clone() };
    let normalized = domain::normalize_email(email)?;
    let mut tx = db.begin_write().await?;
    if let Some(mut user) = repo.user_by_email(&mut tx, &normalized).await? {
        if !user.roles.iter().any(|r| r == "admin") {
            user.roles.push("admin".into());
            user.updated_at = clock.now_ms();
            repo.update_profile(&mut tx, &user).await?;
        }
        tx.commit().await?;
        return Ok((user, false));
    }
    drop(tx);
    let user = create_user(
        &repo,
        clock.now_ms(),
        email,
        password,
        "",
        &[Role::Customer, Role::Admin],
        None,
    )
    .await?;
    Ok((user, true))
}
