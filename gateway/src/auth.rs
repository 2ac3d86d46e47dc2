//! Access-token verification: EdDSA only, keys from the users service's JWKS.
//!
//! The algorithm is pinned (a token saying `none` or `HS256` is refused before any key is
//! looked at). Keys are fetched at start and every `jwks_refresh_secs`; a token with an unknown
//! `kid` triggers one refetch (at most every `jwks_refetch_min_secs`, however many such tokens
//! arrive at once: the first claims the turn); while the users service is down the last good
//! key set stays in use, and a token with an unknown `kid` is refused at once. Verified tokens are cached until they expire, so the hot path
//! is one hash lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

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
    users: UsersServiceClient<shopverse_rpc::Link>,
    keys: RwLock<HashMap<String, DecodingKey>>,
    validation: Validation,
    /// Shared identities: a hit hands out a reference count, not a copy of the caller.
    /// Keyed by the token, hashed with aHash: SipHash of a ~400-byte token was the largest
    /// part of a cached check. Seeded at random per process.
    cache: Mutex<HashMap<String, (Arc<Identity>, i64), ahash::RandomState>>,
    last_fetch: Mutex<Option<Instant>>,
    /// Unknown `kid`s refetch the key set at most this often.
    refetch_every: Duration,
    clock: Arc<dyn Clock>,
    /// Key-set fetches by outcome (`ok`, `failed`), when counted ([`Verifier::counted`]).
    fetches: Option<prometheus::IntCounterVec>,
}

impl Verifier {
    pub fn new(
        users: impl Into<shopverse_rpc::Link>,
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
            users: UsersServiceClient::new(users.into()),
            keys: RwLock::new(HashMap::new()),
            validation,
            cache: Mutex::new(HashMap::with_hasher(crate::seeded_ahash())),
            last_fetch: Mutex::new(None),
            refetch_every: Duration::from_secs(config.jwks_refetch_min_secs),
            clock,
            fetches: None,
        }
    }

    /// Counts key-set fetches in `gateway_jwks_fetches_total{outcome}` of `registry`.
    pub fn counted(mut self, registry: &prometheus::Registry) -> Verifier {
        self.fetches = Some(shopverse_kit::metrics::int_counter_vec(
            registry,
            "gateway_jwks_fetches_total",
            "Fetches of the users service's key set, by outcome (ok, failed)",
            &[],
            &["outcome"],
        ));
        self
    }

    /// Fetches the key set; on failure the previous one stays.
    pub async fn refresh(&self) -> Result<usize, tonic::Status> {
        if let Ok(mut last) = self.last_fetch.lock() {
            *last = Some(Instant::now());
        }
        self.fetch().await
    }

    /// The turn to refetch for an unknown `kid`, if one is due: taken under the lock, so of
    /// many such tokens at once only the first fetches.
    fn claim_refetch(&self) -> bool {
        let Ok(mut last) = self.last_fetch.lock() else {
            return false;
        };
        if last.is_none_or(|t| t.elapsed() >= self.refetch_every) {
            *last = Some(Instant::now());
            true
        } else {
            false
        }
    }

    async fn fetch(&self) -> Result<usize, tonic::Status> {
        let fetched = self.users.clone().get_jwks(GetJwksRequest {}).await;
        if let Some(c) = &self.fetches {
            let outcome = if fetched.is_ok() { "ok" } else { "failed" };
            c.with_label_values(&[outcome]).inc();
        }
        let jwks = fetched?.into_inner();
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

    /// How much longer `token`, verified before, stays valid: through the second of its `exp`
    /// plus the leeway, as verification counts it. `None` once it has expired, or when it is
    /// not among the verified tokens (never verified here, or its key was withdrawn).
    pub fn remaining(&self, token: &str) -> Option<std::time::Duration> {
        let now = self.clock.now_secs();
        let cache = self.cache.lock().ok()?;
        let (_, exp) = cache.get(token)?;
        let left = exp + i64::try_from(self.validation.leeway).unwrap_or(0) + 1 - now;
        (left > 0).then(|| std::time::Duration::from_secs(left.unsigned_abs()))
    }

    /// Verifies `token` (without the `Bearer ` prefix).
    pub async fn verify(&self, token: &str) -> Result<Arc<Identity>, AuthError> {
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
                if self.claim_refetch() {
                    let _ = self.fetch().await;
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
        let id = Arc::new(Identity {
            user_id: data.claims.sub,
            roles: data
                .claims
                .roles
                .iter()
                .filter_map(|r| Role::parse(r))
                .collect(),
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header};

    /// A token signed with the Ed25519 key of `seed`, and that key's public half.
    fn signed(
        seed: [u8; 32],
        kid: &str,
        config: &crate::config::GatewayConfig,
    ) -> (String, DecodingKey) {
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        let public = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public);
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        let now = shopverse_kit::SystemClock.now_secs();
        let claims = serde_json::json!({"sub": "u1", "roles": ["customer"], "iss": config.issuer,
            "aud": config.audience, "exp": now + 600});
        let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&der))
            .expect("signed");
        (
            token,
            DecodingKey::from_ed_components(&x).expect("public key"),
        )
    }

    #[tokio::test]
    async fn a_withdrawn_key_stops_admitting_its_cached_tokens() {
        let config = crate::config::GatewayConfig::default();
        // Nothing listens on port 9: a refetch of the key set fails at once.
        let channel = tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy();
        let v = Verifier::new(channel, &config, Arc::new(shopverse_kit::SystemClock));
        let (token, k1) = signed([1; 32], "k1", &config);
        let (_, k2) = signed([2; 32], "k2", &config);
        v.install_keys(HashMap::from([("k1".to_owned(), k1.clone())]));
        assert_eq!(
            v.verify(&token).await.map(|id| id.user_id.clone()),
            Ok("u1".to_owned())
        );
        // Adding a key keeps what was verified.
        v.install_keys(HashMap::from([
            ("k1".to_owned(), k1),
            ("k2".to_owned(), k2.clone()),
        ]));
        assert!(v.verify(&token).await.is_ok());
        // Withdrawing k1: its token is refused now, not when it expires.
        v.install_keys(HashMap::from([("k2".to_owned(), k2)]));
        assert_eq!(
            v.verify(&token).await.map(|id| id.user_id.clone()),
            Err(AuthError::UnknownKey)
        );
    }
}
