//! The browser's session, as OAuth 2.0 for browser-based apps has it: the web page keeps the
//! access token in memory only; the refresh token lives in an `HttpOnly`, `SameSite=Strict`
//! cookie scoped to these routes (`Secure` under TLS), which page scripts never see.
//!
//! - `POST /v1/auth/session` `{"email", "password"}`: signs in; the access token in the body,
//!   the refresh token in the cookie.
//! - `POST /v1/auth/session/refresh`: a new access token for the cookie's refresh token (which
//!   is rotated).
//! - `POST /v1/auth/session/logout`: revokes the refresh token and clears the cookie.
//!
//! Cross-site request forgery: the cookie is `SameSite=Strict`; every call must carry the
//! header `X-ShopVerse-CSRF` (a form cannot send one, and a cross-origin script can only after
//! a CORS preflight the gateway refuses to origins it does not allow); an `Origin`, when sent,
//! must be the gateway's own or an allowed CORS origin.

use http::{Method, StatusCode};
use pingora::prelude::Session;
use prost::Message;
use tonic::Code;
use tonic::metadata::MetadataMap;

use crate::gateway::Gateway;
use crate::proxy::{Ctx, Label};
use crate::reply::Reply;
use crate::transcode::request_message;

/// Where the session routes live, and the cookie's path.
pub const PREFIX: &str = "/v1/auth/session";
const COOKIE: &str = "sv_refresh";
pub const CSRF_HEADER: &str = "x-shopverse-csrf";

#[derive(Clone, Copy)]
enum Call {
    Login,
    Refresh,
    Logout,
}

fn refused(status: StatusCode, code: Code, message: &str) -> Reply {
    Reply::error(status, code, message, serde_json::json!([]))
}

/// The refresh token in a `Cookie` header, if it is one a token could be.
fn cookie_token(cookie: Option<&str>) -> Option<&str> {
    cookie?
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 4096
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=".contains(&b))
        })
}

/// The `Set-Cookie` value that holds `token` for `max_age` seconds (0 clears it).
fn set_cookie(token: &str, max_age: i64, secure: bool) -> String {
    let mut c = format!(
        "{COOKIE}={token}; Path={PREFIX}; Max-Age={}; HttpOnly; SameSite=Strict",
        max_age.max(0)
    );
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// Whether an `Origin` is this gateway's own (`scheme://host` the request was sent to).
fn same_origin(origin: &str, host: Option<&str>, tls: bool) -> bool {
    let scheme = if tls { "https://" } else { "http://" };
    host.is_some_and(|h| origin.strip_prefix(scheme) == Some(h))
}

impl Gateway {
    /// Answers a session route (see the module's description).
    pub(crate) async fn session_call(&self, session: &mut Session, ctx: &mut Ctx) -> Reply {
        let path = session.req_header().uri.path().to_owned();
        let (call, label, grpc_path) = match path.strip_prefix(PREFIX) {
            Some("") => (Call::Login, PREFIX, "/v1/auth/login"),
            Some("/refresh") => (
                Call::Refresh,
                "/v1/auth/session/refresh",
                "/v1/auth/refresh",
            ),
            Some("/logout") => (Call::Logout, "/v1/auth/session/logout", "/v1/auth/logout"),
            _ => {
                ctx.route = Label::Fixed("not_found");
                let message = format!("no route for {path}");
                return refused(StatusCode::NOT_FOUND, Code::NotFound, &message);
            }
        };
        ctx.route = Label::Fixed(label);
        if session.req_header().method != Method::POST {
            let reply = refused(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
                "use POST",
            );
            return reply.with("allow", "POST");
        }
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let headers = &session.req_header().headers;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if header(CSRF_HEADER).is_none_or(str::is_empty) {
            let message = "the X-ShopVerse-CSRF header is required on session routes";
            return refused(StatusCode::FORBIDDEN, Code::PermissionDenied, message);
        }
        if let Some(origin) = header("origin") {
            ctx.cors = self.config.load().cors.allow(origin);
            if ctx.cors.is_none() && !same_origin(origin, header("host"), tls) {
                let message = "this origin may not use the session routes";
                return refused(StatusCode::FORBIDDEN, Code::PermissionDenied, message);
            }
        }
        let cookie = cookie_token(header("cookie")).map(str::to_owned);
        let ip = self.client_ip(session);
        if let Err(reply) = self
            .admit(&path, crate::router::Access::Public, None, ip)
            .await
        {
            return reply;
        }
        let Ok(m) = self.router.find(&Method::POST, grpc_path) else {
            let message = "the users service's routes are missing";
            return refused(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, message);
        };
        let body = match (call, cookie) {
            (Call::Login, _) => {
                let raw = match self.read_body(session).await {
                    Ok(b) => b,
                    Err(reply) => return reply,
                };
                match request_message(m.route, &m.bindings, None, &raw) {
                    Ok(msg) => msg.encode_to_vec(),
                    Err(e) => {
                        let details = match &e.field {
                            Some(f) => serde_json::json!([{ "field": f }]),
                            None => serde_json::json!([]),
                        };
                        return Reply::error(
                            StatusCode::BAD_REQUEST,
                            Code::InvalidArgument,
                            &e.message,
                            details,
                        );
                    }
                }
            }
            (Call::Refresh, Some(token)) => shopverse_proto::users::v1::RefreshRequest {
                refresh_token: token,
            }
            .encode_to_vec(),
            (Call::Logout, Some(token)) => shopverse_proto::users::v1::LogoutRequest {
                refresh_token: token,
            }
            .encode_to_vec(),
            (Call::Logout, None) => {
                // Nothing to revoke: signed out already.
                return Reply::json(StatusCode::OK, b"{}".to_vec())
                    .with("set-cookie", set_cookie("", 0, tls));
            }
            (Call::Refresh, None) => {
                let message = "no session: sign in";
                return refused(StatusCode::UNAUTHORIZED, Code::Unauthenticated, message);
            }
        };
        let mut md = MetadataMap::new();
        if let Ok(v) = ctx.request_id.parse() {
            md.insert("x-request-id", v);
        }
        let reply = self.call(m.route, body.into(), md).await;
        match call {
            Call::Logout => reply.with("set-cookie", set_cookie("", 0, tls)),
            Call::Login | Call::Refresh if reply.status != StatusCode::OK => {
                // A refresh token the service refused is of no further use.
                match (call, reply.status) {
                    (Call::Refresh, StatusCode::UNAUTHORIZED) => {
                        reply.with("set-cookie", set_cookie("", 0, tls))
                    }
                    _ => reply,
                }
            }
            Call::Login | Call::Refresh => into_session(reply, tls),
        }
    }
}

/// A token pair's answer with the refresh token moved from the body into the cookie.
fn into_session(reply: Reply, tls: bool) -> Reply {
    let Ok(serde_json::Value::Object(mut pair)) = serde_json::from_slice(&reply.body) else {
        return refused(
            StatusCode::BAD_GATEWAY,
            Code::Internal,
            "the users service's answer is not a token pair",
        );
    };
    let token = pair
        .remove("refreshToken")
        .and_then(|t| t.as_str().map(str::to_owned));
    let max_age = pair
        .remove("refreshExpiresIn")
        .and_then(|v| match v {
            serde_json::Value::String(s) => s.parse().ok(),
            other => other.as_i64(),
        })
        .unwrap_or(0);
    let Some(token) = token.filter(|t| cookie_token(Some(&format!("{COOKIE}={t}"))).is_some())
    else {
        return refused(
            StatusCode::BAD_GATEWAY,
            Code::Internal,
            "the users service's refresh token cannot be a cookie",
        );
    };
    let body = serde_json::Value::Object(pair).to_string().into_bytes();
    Reply::json(StatusCode::OK, body).with("set-cookie", set_cookie(&token, max_age, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_read_among_others_and_junk_is_not_a_token() {
        assert_eq!(
            cookie_token(Some("a=1; sv_refresh=abc.DEF-_x; b=2")),
            Some("abc.DEF-_x")
        );
        assert_eq!(cookie_token(Some("sv_refresh=")), None);
        assert_eq!(cookie_token(Some("sv_refresh=a b")), None);
        assert_eq!(cookie_token(Some("sv_refresh=a\"b")), None);
        assert_eq!(cookie_token(Some("other=1")), None);
        assert_eq!(cookie_token(None), None);
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_scoped_to_the_session_routes() {
        let c = set_cookie("tok", 3600, false);
        assert_eq!(
            c,
            "sv_refresh=tok; Path=/v1/auth/session; Max-Age=3600; HttpOnly; SameSite=Strict"
        );
        assert!(set_cookie("tok", 60, true).ends_with("; Secure"));
        assert!(set_cookie("", -5, false).contains("Max-Age=0"));
    }

    #[test]
    fn only_the_gateways_own_origin_is_same_origin() {
        let host = Some("shop.example:8080");
        assert!(same_origin("http://shop.example:8080", host, false));
        assert!(!same_origin("https://shop.example:8080", host, false));
        assert!(!same_origin("http://evil.example", host, false));
        assert!(!same_origin("http://shop.example:8080.evil", host, false));
        assert!(!same_origin("http://shop.example:8080", None, false));
    }
}
