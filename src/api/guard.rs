//! The limit on failed bearer authentications per client address: a guesser gets
//! [`FAILURES_PER_MINUTE`] wrong tokens a minute, then `429` with `Retry-After`.
//!
//! [`authenticate`](super::authenticate) looks the token up, then asks [`AuthGuard::verdict`]
//! what to answer. Each address has a token bucket of failures (capacity and refill from the
//! per-minute figure): a wrong token takes one and is answered 401; once the bucket is empty,
//! every token the address has not used successfully before is answered 429 — right or wrong,
//! so a guesser that ignores the 429s learns nothing from them. Valid tokens are never counted,
//! and a credential that already worked from an address keeps working there while it is
//! blocked: a guesser sharing an address with the product (the same host, a NAT) cannot lock
//! the product's ingest out. A request without a token is no guess and is not counted. IPv6
//! addresses are keyed by their /64, which one host usually holds whole. The map is bounded
//! ([`MAX_TRACKED`] addresses, [`KNOWN_PER_ADDRESS`] credentials each, oldest out first).
//! Outcomes are counted in `kyberhook_auth_failures_total{outcome="unauthorized"|"limited"}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// Wrong tokens one client address may present per minute (the bucket's size, too).
pub const FAILURES_PER_MINUTE: u32 = 20;
/// Addresses tracked at once.
pub const MAX_TRACKED: usize = 100_000;
/// Credentials remembered per address as having worked there.
pub const KNOWN_PER_ADDRESS: usize = 8;
/// How long a credential that worked from an address is remembered there.
const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);
/// A remembered credential's time is refreshed at most this often (a write on the hot path).
const REFRESH_EVERY: Duration = Duration::from_secs(60);

/// Which credential authenticated, as the guard remembers it (never the token itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Admin,
    /// The SHA-256 of an account's API key, as the registry stores it.
    Account([u8; 32]),
}

/// What to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Serve,
    Unauthorized,
    /// 429, come back after this many seconds.
    Limited(u32),
}

#[derive(Default)]
struct Client {
    /// Failures still allowed and when that was computed; `None` until the first failure.
    bucket: Option<(f64, Instant)>,
    known: Vec<(Credential, Instant)>,
}

/// Failed authentications per client address.
pub struct AuthGuard {
    per_minute: f64,
    clients: RwLock<HashMap<IpAddr, Client>>,
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
            clients: RwLock::new(HashMap::new()),
        }
    }

    /// Failures left in a bucket now.
    fn left(&self, bucket: Option<(f64, Instant)>, now: Instant) -> f64 {
        match bucket {
            None => self.per_minute,
            Some((tokens, at)) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                (tokens + elapsed * self.per_minute / 60.0).min(self.per_minute)
            }
        }
    }

    /// What to answer a request from `ip` whose token named `credential` (`None`: no valid
    /// credential), recording the outcome.
    pub fn verdict(&self, ip: IpAddr, credential: Option<Credential>) -> Verdict {
        let ip = key(ip);
        let now = Instant::now();
        let (left, known_at) = {
            let map = self
                .clients
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match map.get(&ip) {
                None => (self.per_minute, None),
                Some(c) => (
                    self.left(c.bucket, now),
                    credential.and_then(|cred| {
                        c.known
                            .iter()
                            .find(|(k, at)| {
                                *k == cred && now.saturating_duration_since(*at) < KNOWN_FOR
                            })
                            .map(|(_, at)| *at)
                    }),
                ),
            }
        };
        let blocked = left < 1.0;
        match credential {
            Some(cred) if !blocked || known_at.is_some() => {
                let stale = match known_at {
                    None => true,
                    Some(at) => now.saturating_duration_since(at) > REFRESH_EVERY,
                };
                if stale {
                    self.remember(ip, cred, now);
                }
                Verdict::Serve
            }
            None if !blocked => {
                metrics::counter!("kyberhook_auth_failures_total", "outcome" => "unauthorized")
                    .increment(1);
                self.fail(ip, now);
                Verdict::Unauthorized
            }
            _ => {
                metrics::counter!("kyberhook_auth_failures_total", "outcome" => "limited")
                    .increment(1);
                let wait = (1.0 - left) * 60.0 / self.per_minute;
                Verdict::Limited(Duration::from_secs_f64(wait).as_secs().saturating_add(1) as u32)
            }
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<IpAddr, Client>> {
        // Every update is a whole assignment; a panic elsewhere leaves nothing half-done.
        let mut map = self
            .clients
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_TRACKED {
            let now = Instant::now();
            map.retain(|_, c| {
                self.left(c.bucket, now) < self.per_minute
                    || c.known
                        .iter()
                        .any(|(_, at)| now.saturating_duration_since(*at) < KNOWN_FOR)
            });
            while map.len() >= MAX_TRACKED {
                let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, c)| {
                        c.known
                            .iter()
                            .map(|(_, at)| *at)
                            .chain(c.bucket.map(|(_, at)| at))
                            .max()
                    })
                    .map(|(k, _)| *k)
                else {
                    break;
                };
                map.remove(&oldest);
            }
        }
        map
    }

    fn remember(&self, ip: IpAddr, credential: Credential, now: Instant) {
        let mut map = self.write();
        let client = map.entry(ip).or_default();
        client.known.retain(|(k, _)| *k != credential);
        if client.known.len() >= KNOWN_PER_ADDRESS {
            client.known.remove(0);
        }
        client.known.push((credential, now));
    }

    fn fail(&self, ip: IpAddr, now: Instant) {
        let mut map = self.write();
        let client = map.entry(ip).or_default();
        let left = self.left(client.bucket, now);
        client.bucket = Some(((left - 1.0).max(0.0), now));
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
        let used = Credential::Account([1; 32]);
        let fresh = Credential::Account([2; 32]);
        assert_eq!(guard.verdict(a, Some(used)), Verdict::Serve);
        for _ in 0..20 {
            assert_eq!(guard.verdict(a, None), Verdict::Unauthorized);
        }
        let Verdict::Limited(wait) = guard.verdict(a, None) else {
            panic!("not limited");
        };
        assert!((1..=4).contains(&wait), "{wait}");
        // Blocked: a credential that worked here before still works; one that did not is
        // refused like a wrong token (a guesser must not tell them apart).
        assert_eq!(guard.verdict(a, Some(used)), Verdict::Serve);
        assert!(matches!(guard.verdict(a, Some(fresh)), Verdict::Limited(_)));
        assert!(matches!(
            guard.verdict(a, Some(Credential::Admin)),
            Verdict::Limited(_)
        ));
        assert_eq!(guard.verdict(b, None), Verdict::Unauthorized);
        assert_eq!(guard.verdict(b, Some(fresh)), Verdict::Serve);
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let guard = AuthGuard::new(2);
        guard.verdict("2001:db8:1:2::1".parse().unwrap(), None);
        guard.verdict("2001:db8:1:2::ffff".parse().unwrap(), None);
        assert!(matches!(
            guard.verdict("2001:db8:1:2::7".parse().unwrap(), None),
            Verdict::Limited(_)
        ));
        assert_eq!(
            guard.verdict("2001:db8:1:3::7".parse().unwrap(), None),
            Verdict::Unauthorized
        );
    }
}
