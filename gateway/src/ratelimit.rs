//! GCRA rate limiting (the generic cell rate algorithm): per policy and consumer, one
//! timestamp of state, exact under bursts, no background refill.
//!
//! With `redis_url` set, the state lives in Redis and one Lua script decides atomically with
//! Redis's own clock, so any number of gateways together admit what one would. If Redis does not
//! answer within a few milliseconds the decision is taken locally (counted in
//! `gateway_rate_limit_fallbacks_total`), so an outage of Redis never stops traffic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use shopverse_kit::Clock;

use crate::config::RateLimitPolicy;

const SHARDS: usize = 16;

/// The verdict, with what the IETF `RateLimit` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the full burst is available again.
    pub reset_secs: u64,
    /// When refused: seconds until a request would be admitted.
    pub retry_after_secs: u64,
}

/// GCRA in Redis: KEYS[1] the consumer's key; ARGV emission interval and tolerance in ms.
/// Returns `{allowed, retry_after_ms, tat_minus_now_ms}`.
const GCRA_LUA: &str = r#"
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tau then
  return {0, math.ceil(tat - now - tau), math.ceil(tat - now)}
end
local new_tat = tat + t
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return {1, 0, math.ceil(new_tat - now)}
"#;

struct Shared {
    /// How long a decision may wait for Redis before it is taken locally.
    budget: std::time::Duration,
    conn: redis::aio::ConnectionManager,
    script: redis::Script,
    prefix: String,
    fallbacks: prometheus::IntCounter,
}

pub struct Limiter {
    clock: Arc<dyn Clock>,
    /// Theoretical arrival time in ms, per (policy, consumer), keyed by the pair's 64-bit hash
    /// so a decision allocates nothing. The hasher's keys are random per process, so nobody can
    /// pick a consumer that collides with another's (by chance: about 1 in 10^9 among 100,000
    /// consumers, and then two share one limit).
    shards: Vec<Mutex<Shard>>,
    /// aHash, as the token cache: SipHash of the pair was a third of a decision.
    hasher: ahash::RandomState,
    shared: Option<Shared>,
}

/// A shard's map. Its keys are already a keyed hash, so FxHash (a multiply) is enough to
/// place them: SipHash again cost two more runs a decision (one to read, one to write).
type Shard = HashMap<u64, i64, rustc_hash::FxBuildHasher>;

fn params(policy: &RateLimitPolicy) -> (f64, f64) {
    let t = f64::from(policy.per_secs) * 1000.0 / f64::from(policy.requests);
    (t, t * f64::from(policy.burst.saturating_sub(1)))
}

impl Limiter {
    pub fn new(clock: Arc<dyn Clock>) -> Limiter {
        Limiter {
            clock,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: crate::seeded_ahash(),
            shared: None,
        }
    }

    /// Shares the limits through Redis at `url` (connected lazily, reconnected on failure).
    pub fn shared(
        mut self,
        url: &str,
        prefix: &str,
        budget: std::time::Duration,
        fallbacks: prometheus::IntCounter,
    ) -> Result<Limiter, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_millis(500)))
            .set_response_timeout(Some(std::time::Duration::from_millis(500)))
            .set_number_of_retries(1);
        let conn = client.get_connection_manager_lazy(config)?;
        self.shared = Some(Shared {
            budget,
            conn,
            script: redis::Script::new(GCRA_LUA),
            prefix: prefix.to_owned(),
            fallbacks,
        });
        Ok(self)
    }

    /// Connects to Redis now (a PING), so the first requests do not fall back while it
    /// connects. A no-op without Redis.
    pub async fn warm_up(&self) -> Result<(), redis::RedisError> {
        if let Some(shared) = &self.shared {
            let mut conn = shared.conn.clone();
            let cmd = redis::cmd("PING");
            let ping = cmd.query_async::<String>(&mut conn);
            match tokio::time::timeout(std::time::Duration::from_secs(2), ping).await {
                Ok(r) => {
                    r?;
                }
                Err(_) => {
                    return Err(redis::RedisError::from(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )));
                }
            }
        }
        Ok(())
    }

    /// Counts one request of `consumer` against policy `index`.
    /// `consumer`'s `Display` is its key in the shared store; in-process only its hash is used.
    pub async fn check<C>(&self, index: usize, policy: &RateLimitPolicy, consumer: &C) -> Decision
    where
        C: std::hash::Hash + std::fmt::Display + ?Sized,
    {
        if let Some(shared) = &self.shared {
            let key = format!("{}{}:{consumer}", shared.prefix, policy.name);
            let (t, tau) = params(policy);
            let mut conn = shared.conn.clone();
            let mut invocation = shared.script.key(&key);
            invocation.arg(t).arg(tau);
            let call = invocation.invoke_async::<(i64, i64, i64)>(&mut conn);
            match tokio::time::timeout(shared.budget, call).await {
                Ok(Ok((allowed, retry_ms, tat_ms))) => {
                    let remaining = ((tau - tat_ms as f64) / t).floor() + 1.0;
                    return Decision {
                        allowed: allowed == 1,
                        limit: policy.burst,
                        remaining: if allowed == 1 {
                            remaining.clamp(0.0, f64::from(policy.burst)) as u32
                        } else {
                            0
                        },
                        reset_secs: (tat_ms as f64 / 1000.0).ceil() as u64,
                        retry_after_secs: if allowed == 1 {
                            0
                        } else {
                            (retry_ms as f64 / 1000.0).ceil().max(1.0) as u64
                        },
                    };
                }
                Ok(Err(e)) => {
                    shared.fallbacks.inc();
                    tracing::debug!(error = %e, "Redis rate limit failed; deciding locally");
                }
                Err(_) => {
                    shared.fallbacks.inc();
                    tracing::debug!("Redis rate limit too slow; deciding locally");
                }
            }
        }
        self.check_local(index, policy, consumer)
    }

    /// The in-process decision.
    pub fn check_local<C>(&self, index: usize, policy: &RateLimitPolicy, consumer: &C) -> Decision
    where
        C: std::hash::Hash + ?Sized,
    {
        let now = self.clock.now_ms();
        // Emission interval and burst tolerance, in ms (f64: sub-ms rates round correctly).
        let (t, tau) = params(policy);
        let key = self.hasher.hash_one((index, consumer));
        let shard = &self.shards[(key as usize) % SHARDS];
        let Ok(mut map) = shard.lock() else {
            // A poisoned shard is a bug elsewhere; failing open keeps the shop up.
            return Decision {
                allowed: true,
                limit: policy.burst,
                remaining: 0,
                reset_secs: 0,
                retry_after_secs: 0,
            };
        };
        if map.len() > 100_000 {
            map.retain(|_, tat| *tat > now);
        }
        // One lookup: a consumer seen for the first time starts at `now` (never refused).
        let slot = map.entry(key).or_insert(now);
        let tat = (*slot).max(now) as f64;
        let now_f = now as f64;
        if tat - now_f > tau {
            let wait = tat - now_f - tau;
            return Decision {
                allowed: false,
                limit: policy.burst,
                remaining: 0,
                reset_secs: ((tat - now_f) / 1000.0).ceil() as u64,
                retry_after_secs: (wait / 1000.0).ceil().max(1.0) as u64,
            };
        }
        let new_tat = tat + t;
        *slot = new_tat as i64;
        let remaining = ((now_f + tau - new_tat) / t).floor() + 1.0;
        Decision {
            allowed: true,
            limit: policy.burst,
            remaining: remaining.clamp(0.0, f64::from(policy.burst)) as u32,
            reset_secs: ((new_tat - now_f) / 1000.0).ceil() as u64,
            retry_after_secs: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitBy;
    use shopverse_kit::ManualClock;

    fn policy(requests: u32, per_secs: u32, burst: u32) -> RateLimitPolicy {
        RateLimitPolicy {
            name: "p".into(),
            paths: vec![],
            requests,
            per_secs,
            burst,
            by: LimitBy::Ip,
        }
    }

    #[test]
    fn admits_the_burst_then_the_rate() {
        let clock = ManualClock::new(1_000_000);
        let l = Limiter::new(Arc::new(clock.clone()));
        let p = policy(10, 60, 10);
        let admitted = (0..25)
            .filter(|_| l.check_local(0, &p, "1.2.3.4").allowed)
            .count();
        assert_eq!(admitted, 10, "the burst");
        let d = l.check_local(0, &p, "1.2.3.4");
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs, 6, "one request per 6 s");
        assert!(
            l.check_local(0, &p, "5.6.7.8").allowed,
            "consumers are independent"
        );
        assert!(
            l.check_local(1, &p, "1.2.3.4").allowed,
            "policies are independent"
        );
        // Over one minute, the rate: 10 more.
        let mut more = 0;
        for _ in 0..600 {
            clock.advance_ms(100);
            if l.check_local(0, &p, "1.2.3.4").allowed {
                more += 1;
            }
        }
        assert_eq!(more, 10);
    }

    #[test]
    fn remaining_counts_down() {
        let clock = ManualClock::new(0);
        let l = Limiter::new(Arc::new(clock));
        let p = policy(50, 1, 5);
        let r: Vec<u32> = (0..5)
            .map(|_| l.check_local(0, &p, "u").remaining)
            .collect();
        assert_eq!(r, vec![4, 3, 2, 1, 0]);
    }

    fn counter() -> prometheus::IntCounter {
        prometheus::IntCounter::new("fallbacks", "test").unwrap()
    }

    /// Two gateways sharing the local Redis admit, together, what one would.
    #[tokio::test]
    async fn two_limiters_share_one_budget_through_redis() {
        let url = std::env::var("SHOPVERSE_TEST_REDIS")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("shopverse-test:{}:", uuid::Uuid::new_v4());
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(0));
        let (fa, fb) = (counter(), counter());
        let a = Limiter::new(clock.clone())
            .shared(&url, &prefix, std::time::Duration::from_secs(1), fa.clone())
            .unwrap();
        let b = Limiter::new(clock)
            .shared(&url, &prefix, std::time::Duration::from_secs(1), fb.clone())
            .unwrap();
        a.warm_up()
            .await
            .expect("Redis at 127.0.0.1:6379 (see README)");
        b.warm_up().await.expect("Redis");
        let p = policy(10, 60, 10);
        let mut admitted = 0;
        for i in 0..24 {
            let l = if i % 2 == 0 { &a } else { &b };
            if l.check(0, &p, "9.9.9.9").await.allowed {
                admitted += 1;
            }
        }
        assert_eq!(fa.get() + fb.get(), 0, "Redis answered every time");
        assert_eq!(admitted, 10);
    }

    #[tokio::test]
    async fn redis_down_falls_back_to_local_limits() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let f = counter();
        let l = Limiter::new(Arc::new(ManualClock::new(0)))
            .shared(
                &format!("redis://{dead}"),
                "x:",
                std::time::Duration::from_millis(50),
                f.clone(),
            )
            .unwrap();
        let p = policy(10, 60, 3);
        let admitted = {
            let mut n = 0;
            for _ in 0..5 {
                if l.check(0, &p, "c").await.allowed {
                    n += 1;
                }
            }
            n
        };
        assert_eq!(admitted, 3, "local limits still apply");
        assert_eq!(f.get(), 5);
    }
}
