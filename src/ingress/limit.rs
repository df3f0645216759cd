//! Per-API rate limits: a token bucket per (API, caller), the caller being its address or
//! the API key it sent. Buckets sit in one sharded map; a bucket that has filled up again
//! is as good as none, and a sweep every few seconds drops those, so the map holds only
//! the callers seen lately.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::model::RateLimit;

/// Who a bucket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    Address(IpAddr),
    /// The first half of the API key's SHA-256 digest: names the key, shows nothing of it.
    Key([u8; 16]),
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// When the bucket will be full again if nobody takes from it: from then on it can go.
    full_at: Instant,
}

#[derive(Debug, Default)]
pub struct RateLimits {
    buckets: DashMap<(u64, Caller), Bucket>,
}

impl RateLimits {
    /// Takes one request from the bucket of `caller` on API `api`, or says how long until
    /// the next one is allowed.
    pub fn admit(
        &self,
        api: &str,
        caller: Caller,
        limit: &RateLimit,
        now: Instant,
    ) -> Result<(), Duration> {
        let burst = f64::from(limit.burst.max(1));
        let rate = limit.per_second;
        let mut bucket = self
            .buckets
            .entry((api_id(api), caller))
            .or_insert_with(|| Bucket {
                tokens: burst,
                at: now,
                full_at: now,
            });
        let refilled =
            bucket.tokens + now.saturating_duration_since(bucket.at).as_secs_f64() * rate;
        let tokens = refilled.min(burst);
        bucket.at = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            bucket.full_at = now + Duration::from_secs_f64((burst - bucket.tokens) / rate);
            Ok(())
        } else {
            bucket.tokens = tokens;
            Err(Duration::from_secs_f64((1.0 - tokens) / rate))
        }
    }

    /// Drops the buckets that are full again by `now`.
    pub fn sweep(&self, now: Instant) {
        self.buckets.retain(|_, b| b.full_at > now);
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

fn api_id(name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_then_refusals_with_the_wait() {
        let limits = RateLimits::default();
        let limit = RateLimit {
            per_second: 2.0,
            burst: 3,
            by: "client".into(),
        };
        let caller = Caller::Address("10.0.0.1".parse().unwrap());
        let other = Caller::Address("10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            limits.admit("a", caller, &limit, t0).unwrap();
        }
        let wait = limits.admit("a", caller, &limit, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Other callers and other APIs have buckets of their own.
        limits.admit("a", other, &limit, t0).unwrap();
        limits.admit("b", caller, &limit, t0).unwrap();
        // Half a second later, one more.
        let t1 = t0 + Duration::from_millis(500);
        limits.admit("a", caller, &limit, t1).unwrap();
        assert!(limits.admit("a", caller, &limit, t1).is_err());
        // Full again after 1.5 s: swept.
        assert_eq!(limits.len(), 3);
        limits.sweep(t1 + Duration::from_secs(2));
        assert!(limits.is_empty());
    }
}
