//! The limit on failed bearer authentications per client address: a guesser gets
//! [`FAILURES_PER_MINUTE`] wrong tokens a minute, then `429` with `Retry-After`.
//!
//! [`authenticate`](super::authenticate) asks [`AuthGuard::admit`] before it looks at a token
//! (a blocked address learns nothing, not even whether a token was right: otherwise a guesser
//! could ignore the 429s and keep testing), and reports each wrong token with
//! [`AuthGuard::failed`]. Valid tokens cost nothing: a client that authenticates is never
//! counted, delayed or blocked unless its address has been guessing. A request without a token
//! is no guess and is not counted either. Each address has a token bucket (capacity and refill
//! from the per-minute figure); IPv6 addresses are keyed by their /64, which one host
//! usually holds whole. The map is bounded: full buckets are dropped when it grows, and past
//! [`MAX_TRACKED`] the oldest entries go. Refusals are counted in
//! `kyberhook_auth_failures_total{outcome="unauthorized"|"limited"}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wrong tokens one client address may present per minute (the bucket's size, too).
pub const FAILURES_PER_MINUTE: u32 = 20;
/// Addresses tracked at once.
pub const MAX_TRACKED: usize = 100_000;

struct Bucket {
    /// Failures still allowed, refilled continuously.
    tokens: f64,
    at: Instant,
}

/// Failed authentications per client address.
pub struct AuthGuard {
    per_minute: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

/// The bucket key: the address, or an IPv6 address's /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl Default for AuthGuard {
    fn default() -> Self {
        AuthGuard::new(FAILURES_PER_MINUTE)
    }
}

impl AuthGuard {
    pub fn new(per_minute: u32) -> Self {
        AuthGuard {
            per_minute: f64::from(per_minute.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Bucket>> {
        // Every update is a whole assignment; a panic elsewhere leaves nothing half-done.
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_minute / 60.0).min(self.per_minute);
        bucket.at = now;
    }

    /// `Err(seconds to wait)` while `ip` has used up its failures.
    pub fn admit(&self, ip: IpAddr) -> Result<(), u32> {
        let now = Instant::now();
        let mut map = self.lock();
        let Some(bucket) = map.get_mut(&key(ip)) else {
            return Ok(());
        };
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            return Ok(());
        }
        metrics::counter!("kyberhook_auth_failures_total", "outcome" => "limited").increment(1);
        let wait = (1.0 - bucket.tokens) * 60.0 / self.per_minute;
        Err(Duration::from_secs_f64(wait).as_secs().saturating_add(1) as u32)
    }

    /// Counts one wrong token from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        metrics::counter!("kyberhook_auth_failures_total", "outcome" => "unauthorized")
            .increment(1);
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= MAX_TRACKED {
            let per_minute = self.per_minute;
            // Buckets that refilled completely hold no information.
            map.retain(|_, b| {
                let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
                b.tokens + elapsed * per_minute / 60.0 < per_minute
            });
            if map.len() >= MAX_TRACKED {
                if let Some(oldest) = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| *k) {
                    map.remove(&oldest);
                }
            }
        }
        let bucket = map.entry(key(ip)).or_insert(Bucket {
            tokens: self.per_minute,
            at: now,
        });
        self.refill(bucket, now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_failures_then_waits_and_others_are_unaffected() {
        let guard = AuthGuard::new(20);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..20 {
            assert!(guard.admit(a).is_ok());
            guard.failed(a);
        }
        let wait = guard.admit(a).unwrap_err();
        assert!((1..=4).contains(&wait), "{wait}");
        assert!(guard.admit(b).is_ok());
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let guard = AuthGuard::new(2);
        guard.failed("2001:db8:1:2::1".parse().unwrap());
        guard.failed("2001:db8:1:2::ffff".parse().unwrap());
        assert!(guard.admit("2001:db8:1:2::7".parse().unwrap()).is_err());
        assert!(guard.admit("2001:db8:1:3::7".parse().unwrap()).is_ok());
    }
}
