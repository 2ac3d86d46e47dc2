//! GCRA rate limiting (the generic cell rate algorithm): per policy and consumer, one
//! timestamp of state, exact under bursts, no background refill.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
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

pub struct Limiter {
    clock: Arc<dyn Clock>,
    /// Theoretical arrival time in ms, per (policy, consumer).
    shards: Vec<Mutex<HashMap<(usize, String), i64>>>,
}

impl Limiter {
    pub fn new(clock: Arc<dyn Clock>) -> Limiter {
        Limiter {
            clock,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Counts one request of `consumer` against policy `index`.
    pub fn check(&self, index: usize, policy: &RateLimitPolicy, consumer: &str) -> Decision {
        let now = self.clock.now_ms();
        // Emission interval and burst tolerance, in ms (f64: sub-ms rates round correctly).
        let t = f64::from(policy.per_secs) * 1000.0 / f64::from(policy.requests);
        let tau = t * f64::from(policy.burst.saturating_sub(1));
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (index, consumer).hash(&mut h);
        let shard = &self.shards[(h.finish() as usize) % SHARDS];
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
        let key = (index, consumer.to_owned());
        let tat = map.get(&key).copied().unwrap_or(now).max(now) as f64;
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
        map.insert(key, new_tat as i64);
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
            .filter(|_| l.check(0, &p, "1.2.3.4").allowed)
            .count();
        assert_eq!(admitted, 10, "the burst");
        let d = l.check(0, &p, "1.2.3.4");
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs, 6, "one request per 6 s");
        assert!(
            l.check(0, &p, "5.6.7.8").allowed,
            "consumers are independent"
        );
        assert!(
            l.check(1, &p, "1.2.3.4").allowed,
            "policies are independent"
        );
        // Over one minute, the rate: 10 more.
        let mut more = 0;
        for _ in 0..600 {
            clock.advance_ms(100);
            if l.check(0, &p, "1.2.3.4").allowed {
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
        let r: Vec<u32> = (0..5).map(|_| l.check(0, &p, "u").remaining).collect();
        assert_eq!(r, vec![4, 3, 2, 1, 0]);
    }
}
