//! The users service over gRPC on a port-0 server, on SQLite and on PostgreSQL.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use shopverse_events::EventBus;
use shopverse_events::embedded::EmbeddedLog;
use shopverse_kit::testing::{PgTestDb, Spawned, as_user, channel, spawn};
use shopverse_kit::{Clock, ManualClock, Role, SystemClock};
use shopverse_proto::common::v1::Address;
use shopverse_proto::users::v1::users_service_client::UsersServiceClient;
use shopverse_proto::users::v1::*;
use shopverse_users::UsersConfig;
use shopverse_users::app::Claims;
use tonic::Code;
use tonic::transport::Channel;

struct Running {
    client: UsersServiceClient<Channel>,
    server: Spawned<shopverse_runtime::RunError>,
    clock: ManualClock,
    log: EmbeddedLog,
    dir: tempfile::TempDir,
}

async fn start(database: Option<&str>) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(SystemClock.now_ms());
    let (platform, log) = shopverse_runtime::testing::platform(dir.path(), Arc::new(clock.clone()))
        .await
        .expect("platform");
    let config = UsersConfig {
        database: database.unwrap_or_default().to_owned(),
        login_max_failures: 3,
        login_lockout_secs: 60,
        ..UsersConfig::default()
    };
    let data = dir.path().to_owned();
    let server = spawn(|listener, stop| async move {
        shopverse_runtime::serve::<shopverse_users::UsersService>(
            listener, config, &data, platform, stop,
        )
        .await
    })
    .await
    .expect("bind");
    let client = UsersServiceClient::new(channel(server.addr).await.expect("connect"));
    Running {
        client,
        server,
        clock,
        log,
        dir,
    }
}

impl Running {
    async fn stop(self) {
        self.server.stop().await;
    }
}

fn reg(email: &str, pw: &str) -> RegisterRequest {
    RegisterRequest {
        email: email.into(),
        password: pw.into(),
        display_name: String::new(),
    }
}

fn login(email: &str, pw: &str) -> LoginRequest {
    LoginRequest {
        email: email.into(),
        password: pw.into(),
    }
}

async fn jwks(c: &mut UsersServiceClient<Channel>) -> JwkSet {
    let keys = c
        .get_jwks(GetJwksRequest {})
        .await
        .expect("jwks")
        .into_inner();
    // Through its JSON form, as a client fetching /.well-known/jwks.json would see it.
    let json = serde_json::json!({
        "keys": keys.keys.iter().map(|k| serde_json::json!({
            "kty": k.kty, "crv": k.crv, "x": k.x, "kid": k.kid, "alg": k.alg, "use": k.r#use,
        })).collect::<Vec<_>>()
    });
    serde_json::from_value(json).expect("a valid JWK set")
}

fn verify(token: &str, set: &JwkSet) -> Claims {
    let header = jsonwebtoken::decode_header(token).expect("header");
    assert_eq!(header.alg, Algorithm::EdDSA);
    let kid = header.kid.expect("kid");
    let jwk = set.find(&kid).expect("kid is published");
    let key = DecodingKey::from_jwk(jwk).expect("key");
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_issuer(&["shopverse"]);
    v.set_audience(&["shopverse-api"]);
    jsonwebtoken::decode::<Claims>(token, &key, &v)
        .expect("valid token")
        .claims
}

type Client = UsersServiceClient<Channel>;

/// Register: normalised email, validation, duplicates. Returns Ada.
async fn registration(c: &mut Client) -> User {
    let ada = c
        .register(reg("  Ada@Example.com", "correct horse battery"))
        .await;
    let user = ada.expect("register").into_inner().user.expect("user");
    assert_eq!(user.email, "ada@example.com");
    assert_eq!(user.display_name, "ada");
    assert_eq!(user.roles, vec!["customer"]);
    let e = c.register(reg("ada@example.com", "another password")).await;
    assert_eq!(e.unwrap_err().code(), Code::AlreadyExists);
    for (email, pw, field) in [
        ("not-an-email", "long enough pw", "email:"),
        ("bob@example.com", "short", "password:"),
    ] {
        let e = c.register(reg(email, pw)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    user
}

/// Ada logs in.
async fn ada_logs_in(c: &mut Client) -> TokenPair {
    let pair = c
        .login(login("ada@example.com", "correct horse battery"))
        .await;
    pair.expect("login").into_inner()
}

/// Login gives a token the published keys verify; a wrong password and an unknown email get
/// the same answer.
async fn logins(c: &mut Client, user: &User) {
    let pair = c
        .login(login("ADA@example.com", "correct horse battery"))
        .await;
    let pair = pair.expect("login").into_inner();
    assert_eq!((pair.token_type.as_str(), pair.expires_in), ("Bearer", 900));
    let claims = verify(&pair.access_token, &jwks(c).await);
    assert_eq!(claims.sub, user.id);
    assert_eq!(claims.roles, vec!["customer"]);
    assert_eq!(claims.exp - claims.iat, 900);

    let wrong = c.login(login("ada@example.com", "wrong password!")).await;
    let unknown = c
        .login(login("nobody@example.com", "wrong password!"))
        .await;
    let (wrong, unknown) = (wrong.unwrap_err(), unknown.unwrap_err());
    assert_eq!(
        (wrong.code(), wrong.message()),
        (unknown.code(), unknown.message())
    );
    assert_eq!(wrong.code(), Code::Unauthenticated);
}

async fn refresh(c: &mut Client, token: &str) -> Result<TokenPair, tonic::Status> {
    let refresh_token = token.to_owned();
    let r = c.refresh(RefreshRequest { refresh_token }).await;
    r.map(tonic::Response::into_inner)
}

/// Refresh rotates; presenting a spent token revokes the whole family; logout revokes too.
async fn refresh_and_logout(c: &mut Client) {
    let pair = ada_logs_in(c).await;
    let second = refresh(c, &pair.refresh_token).await.expect("refresh");
    assert_ne!(second.refresh_token, pair.refresh_token);
    verify(&second.access_token, &jwks(c).await);
    let reuse = refresh(c, &pair.refresh_token).await.unwrap_err();
    assert_eq!(reuse.code(), Code::Unauthenticated);
    assert!(reuse.message().contains("revoked"), "{}", reuse.message());
    let after = refresh(c, &second.refresh_token).await.unwrap_err();
    assert_eq!(after.code(), Code::Unauthenticated, "the family is revoked");

    let pair = ada_logs_in(c).await;
    let logout = LogoutRequest {
        refresh_token: pair.refresh_token.clone(),
    };
    c.logout(logout).await.expect("logout");
    let e = refresh(c, &pair.refresh_token).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

/// The profile needs an identity; addresses are checked and normalised.
async fn profile(c: &mut Client, user: &User) {
    let anonymous = c.get_me(GetMeRequest {}).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let me = c
        .get_me(as_user(GetMeRequest {}, &user.id, &[Role::Customer]))
        .await;
    assert_eq!(me.expect("me").into_inner().email, "ada@example.com");
    let home = Address {
        label: "home".into(),
        line1: "1 Analytical Way".into(),
        city: "London".into(),
        postal_code: "N1 9GU".into(),
        country: "gb".into(),
        ..Default::default()
    };
    let update = |display_name: Option<&str>, address: Address| {
        let change = UpdateMeRequest {
            display_name: display_name.map(str::to_owned),
            addresses: Some(AddressList {
                addresses: vec![address],
            }),
        };
        as_user(change, &user.id, &[Role::Customer])
    };
    let updated = c.update_me(update(Some("Ada L."), home)).await;
    let updated = updated.expect("update").into_inner();
    assert_eq!(updated.display_name, "Ada L.");
    assert_eq!(updated.addresses[0].country, "GB");
    let bad = c
        .update_me(update(None, Address::default()))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

/// Admin calls need the admin role: listing pages through every user, roles are checked.
async fn administration(c: &mut Client, user: &User) {
    let as_customer = as_user(ListUsersRequest::default(), &user.id, &[Role::Customer]);
    let e = c.list_users(as_customer).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    for i in 0..4 {
        let r = c.register(reg(&format!("u{i}@example.com"), "long enough pw"));
        r.await.expect("register");
    }
    fn admin<T>(m: T) -> tonic::Request<T> {
        as_user(m, "the-admin", &[Role::Admin])
    }
    let page = |page_token: String| {
        admin(ListUsersRequest {
            page_size: 3,
            page_token,
            ..Default::default()
        })
    };
    let page1 = c
        .list_users(page(String::new()))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page1.users.len(), 3);
    assert!(!page1.next_page_token.is_empty());
    let page2 = c
        .list_users(page(page1.next_page_token))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page2.users.len(), 2);
    assert!(page2.next_page_token.is_empty());

    let roles = |user_id: &str, roles: &[&str]| {
        admin(SetRolesRequest {
            user_id: user_id.to_owned(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        })
    };
    let promoted = c.set_roles(roles(&user.id, &["customer", "admin"])).await;
    assert_eq!(
        promoted.expect("set roles").into_inner().roles,
        ["customer", "admin"]
    );
    let e = c.set_roles(roles(&user.id, &["wizard"])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c.set_roles(roles("missing", &["admin"])).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

/// How many records the users topic holds.
async fn user_events(log: &EmbeddedLog) -> usize {
    let mut n = 0;
    for p in 0..log.partitions("shopverse.users").await.expect("partitions") {
        n += log
            .fetch("shopverse.users", p, 0, 100)
            .await
            .expect("fetch")
            .len();
    }
    n
}

async fn accounts_tokens_and_profiles(database: Option<&str>) {
    let mut s = start(database).await;
    let user = registration(&mut s.client).await;
    logins(&mut s.client, &user).await;
    refresh_and_logout(&mut s.client).await;
    profile(&mut s.client, &user).await;
    administration(&mut s.client, &user).await;

    // The five registrations reached the event log through the outbox.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = user_events(&s.log).await;
        if n == 5 {
            break;
        }
        let waiting = tokio::time::Instant::now() < deadline;
        assert!(waiting, "only {n} of 5 user.registered events published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn accounts_tokens_and_profiles_sqlite() {
    accounts_tokens_and_profiles(None).await;
}

#[tokio::test]
async fn accounts_tokens_and_profiles_postgres() {
    let pg = PgTestDb::create()
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (see README)");
    accounts_tokens_and_profiles(Some(&pg.url)).await;
    pg.drop_db().await.expect("drop");
}

#[tokio::test]
async fn repeated_failures_lock_the_account_for_a_while() {
    let mut s = start(None).await;
    let c = &mut s.client;
    c.register(reg("eve@example.com", "right password"))
        .await
        .expect("register");
    for _ in 0..3 {
        let e = c
            .login(login("eve@example.com", "wrong password"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let e = c
        .login(login("eve@example.com", "right password"))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::ResourceExhausted,
        "locked even with the right password"
    );
    assert!(e.message().contains("try again in 60 s"), "{}", e.message());
    // Unknown emails are throttled the same way, so the lock reveals nothing.
    for _ in 0..3 {
        c.login(login("ghost@example.com", "whatever pw"))
            .await
            .unwrap_err();
    }
    assert_eq!(
        c.login(login("ghost@example.com", "whatever pw"))
            .await
            .unwrap_err()
            .code(),
        Code::ResourceExhausted
    );
    s.clock.advance_ms(61_000);
    c.login(login("eve@example.com", "right password"))
        .await
        .expect("unlocked after the lockout");
    s.stop().await;
}

#[tokio::test]
async fn rotated_keys_sign_new_tokens_and_old_ones_stay_published() {
    let mut s = start(None).await;
    s.client
        .register(reg("kim@example.com", "kims password"))
        .await
        .expect("register");
    let before = s
        .client
        .login(login("kim@example.com", "kims password"))
        .await
        .expect("login")
        .into_inner();
    let keys_dir = s.dir.path().join("keys");
    s.clock.advance_ms(5);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let new_kid = shopverse_users::keys::rotate(&keys_dir, s.clock.now_ms()).expect("rotate");
    let after = s
        .client
        .login(login("kim@example.com", "kims password"))
        .await
        .expect("login")
        .into_inner();
    let set = jwks(&mut s.client).await;
    assert_eq!(set.keys.len(), 2);
    verify(&before.access_token, &set);
    verify(&after.access_token, &set);
    assert_eq!(
        jsonwebtoken::decode_header(&after.access_token)
            .expect("header")
            .kid,
        Some(new_kid)
    );
    // Once every token of the old key has expired, only the new key is published.
    s.clock.advance_ms((900 + 61) * 1000);
    assert_eq!(jwks(&mut s.client).await.keys.len(), 1);
    s.stop().await;
}
