//! Access-token verification: EdDSA only, keys from the users service's JWKS.
//!
//! The algorithm is pinned (a token saying `none` or `HS256` is refused before any key is
//! looked at). Keys are fetched at start and every `jwks_refresh_secs`; a token with an unknown
//! `kid` triggers one refetch (at most every ten seconds); while the users service is down the
//! last good key set stays in use. Verified tokens are cached until they expire, so the hot path
//! is one hash lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tonic::transport::Channel;

use shopverse_kit::{Clock, Identity, Role};
use shopverse_proto::users::v1::GetJwksRequest;
use shopverse_proto::users::v1::users_service_client::UsersServiceClient;

const CACHE_MAX: usize = 50_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the token is malformed")]
    Malformed,
    #[error("only EdDSA tokens are accepted")]
    Algorithm,
    #[error("the token's key is unknown")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    Signature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued for another audience or issuer")]
    Claims,
}

impl AuthError {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Algorithm => "algorithm",
            AuthError::UnknownKey => "unknown_kid",
            AuthError::Signature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Claims => "claims",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
    exp: i64,
}

pub struct Verifier {
    users: UsersServiceClient<Channel>,
    keys: RwLock<HashMap<String, DecodingKey>>,
    validation: Validation,
    cache: Mutex<HashMap<String, (Identity, i64)>>,
    last_fetch: Mutex<Option<Instant>>,
    /// Unknown `kid`s refetch the key set at most this often.
    refetch_every: Duration,
    clock: Arc<dyn Clock>,
}

impl Verifier {
    pub fn new(
        users: Channel,
        config: &crate::config::GatewayConfig,
        clock: Arc<dyn Clock>,
    ) -> Verifier {
        let (issuer, audience, leeway_secs) = (
            config.issuer.as_str(),
            config.audience.as_str(),
            config.leeway_secs,
        );
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.leeway = leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Verifier {
            users: UsersServiceClient::new(users),
            keys: RwLock::new(HashMap::new()),
            validation,
            cache: Mutex::new(HashMap::new()),
            last_fetch: Mutex::new(None),
            refetch_every: Duration::from_secs(config.jwks_refetch_min_secs),
            clock,
        }
    }

    /// Fetches the key set; on failure the previous one stays.
    pub async fn refresh(&self) -> Result<usize, tonic::Status> {
        if let Ok(mut last) = self.last_fetch.lock() {
            *last = Some(Instant::now());
        }
        let jwks = self
            .users
            .clone()
            .get_jwks(GetJwksRequest {})
            .await?
            .into_inner();
        let mut keys = HashMap::new();
        for k in jwks.keys {
            if k.kty == "OKP"
                && k.crv == "Ed25519"
                && (k.alg.is_empty() || k.alg == "EdDSA")
                && let Ok(key) = DecodingKey::from_ed_components(&k.x)
            {
                keys.insert(k.kid, key);
            }
        }
        let n = keys.len();
        self.install_keys(keys);
        Ok(n)
    }

    /// Replaces the key set. Tokens verified with a key that is no longer in it are forgotten,
    /// so a withdrawn key stops admitting its tokens at once, not when they expire.
    pub fn install_keys(&self, keys: HashMap<String, DecodingKey>) {
        let withdrawn = match self.keys.write() {
            Ok(mut w) => {
                let withdrawn = w.keys().any(|kid| !keys.contains_key(kid));
                *w = keys;
                withdrawn
            }
            Err(_) => true,
        };
        if withdrawn && let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
    }

    /// Refreshes every `every` until `shutdown`.
    pub async fn refresh_loop(
        self: Arc<Self>,
        every: Duration,
        shutdown: shopverse_kit::CancellationToken,
    ) {
        loop {
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "fetching the JWKS failed; keeping the last key set");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        self.keys.read().ok().and_then(|k| k.get(kid).cloned())
    }

    /// Verifies `token` (without the `Bearer ` prefix).
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let now = self.clock.now_secs();
        if let Ok(cache) = self.cache.lock()
            && let Some((id, exp)) = cache.get(token)
            && *exp + i64::try_from(self.validation.leeway).unwrap_or(0) > now
        {
            return Ok(id.clone());
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Algorithm);
        }
        let kid = header.kid.ok_or(AuthError::UnknownKey)?;
        let key = match self.key(&kid) {
            Some(k) => k,
            None => {
                let due = self
                    .last_fetch
                    .lock()
                    .map(|l| l.is_none_or(|t| t.elapsed() >= self.refetch_every))
                    .unwrap_or(false);
                if due {
                    let _ = self.refresh().await;
                }
                self.key(&kid).ok_or(AuthError::UnknownKey)?
            }
        };
        let data = jsonwebtoken::decode::<Claims>(token, &key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidAudience | K::InvalidIssuer | K::MissingRequiredClaim(_) => {
                    AuthError::Claims
                }
                K::InvalidSignature => AuthError::Signature,
                K::InvalidAlgorithm | K::InvalidAlgorithmName => AuthError::Algorithm,
                _ => AuthError::Malformed,
            }
        })?;
        let id = Identity {
            user_id: data.claims.sub,
            roles: data
                .claims
                .roles
                .iter()
                .filter_map(|r| Role::parse(r))
                .collect(),
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_MAX {
                cache.retain(|_, (_, exp)| *exp > now);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(token.to_owned(), (id.clone(), data.claims.exp));
        }
        Ok(id)
    }
}
