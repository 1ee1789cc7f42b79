//! Rate limits of manual retries (`POST …/deliveries/{id}/retry`).
//!
//! Every manual retry costs a store write, a group commit and an attempt, and adds to the
//! delivery's history; a script looping over the retry route could otherwise make the engine
//! attempt one endpoint as fast as it can send requests. The API asks [`ManualRetryLimits`]
//! before it touches the delivery: each delivery may be retried [`PER_DELIVERY_BURST`] times at
//! once and then once per [`PER_DELIVERY_PERIOD`], each account [`PER_ACCOUNT_PER_SECOND`] times
//! a second with a burst of [`PER_ACCOUNT_BURST`] (enough to re-drive a backlog by script at a
//! steady pace). An excess retry is refused with the time after which it may come, which the
//! API turns into `429` with `Retry-After`. The limiters are governor GCRA cells keyed by
//! delivery and by account, driven by the engine clock; keys whose cells are back to a fresh
//! state are dropped every [`HOUSEKEEPING_EVERY`] checks, so the maps stay as small as the set of
//! recently retried deliveries.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::ids::{AccountId, DeliveryId};
use crate::ratelimit::EngineClock;

/// Manual retries of one delivery allowed at once.
pub const PER_DELIVERY_BURST: u32 = 5;
/// After the burst, one manual retry of a delivery per this period.
pub const PER_DELIVERY_PERIOD: Duration = Duration::from_secs(12);
/// Manual retries per second of one account, all its deliveries together.
pub const PER_ACCOUNT_PER_SECOND: u32 = 20;
/// Manual retries one account may make at once.
pub const PER_ACCOUNT_BURST: u32 = 100;
/// Checks between two sweeps of stale keys.
const HOUSEKEEPING_EVERY: u64 = 1024;

type Keyed<K> = RateLimiter<K, DashMapStateStore<K>, EngineClock, NoOpMiddleware<Duration>>;

/// Which limit refused a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Delivery,
    Account,
}

/// A manual retry over its limit, and how long until one would be allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}; retry in {retry_after_secs} s", match .scope {
    Scope::Delivery => format!("this delivery was retried by hand more than {PER_DELIVERY_BURST} times recently (then one per {} s)", PER_DELIVERY_PERIOD.as_secs()),
    Scope::Account => format!("this account retries deliveries by hand faster than {PER_ACCOUNT_PER_SECOND} per second"),
})]
pub struct RetryLimited {
    pub scope: Scope,
    /// Whole seconds, at least 1: what `Retry-After` says.
    pub retry_after_secs: u32,
}

pub struct ManualRetryLimits {
    per_delivery: Keyed<DeliveryId>,
    per_account: Keyed<AccountId>,
    checks: AtomicU64,
}

impl Default for ManualRetryLimits {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualRetryLimits {
    pub fn new() -> Self {
        let nz = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let per_delivery = Quota::with_period(PER_DELIVERY_PERIOD)
            .expect("the period is not zero")
            .allow_burst(nz(PER_DELIVERY_BURST));
        let per_account =
            Quota::per_second(nz(PER_ACCOUNT_PER_SECOND)).allow_burst(nz(PER_ACCOUNT_BURST));
        ManualRetryLimits {
            per_delivery: RateLimiter::dashmap_with_clock(per_delivery, EngineClock),
            per_account: RateLimiter::dashmap_with_clock(per_account, EngineClock),
            checks: AtomicU64::new(0),
        }
    }

    /// Takes one manual retry of `delivery` (of `account`), or says how long to wait.
    pub fn check(&self, account: &AccountId, delivery: DeliveryId) -> Result<(), RetryLimited> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % HOUSEKEEPING_EVERY
            == HOUSEKEEPING_EVERY - 1
        {
            self.per_delivery.retain_recent();
            self.per_account.retain_recent();
        }
        let refused = |scope, not_until: governor::NotUntil<Duration>| {
            let wait = not_until.wait_time_from(EngineClock.now());
            RetryLimited {
                scope,
                retry_after_secs: u32::try_from(wait.as_millis().div_ceil(1000))
                    .unwrap_or(u32::MAX)
                    .max(1),
            }
        };
        self.per_delivery
            .check_key(&delivery)
            .map_err(|n| refused(Scope::Delivery, n))?;
        self.per_account
            .check_key(account)
            .map_err(|n| refused(Scope::Account, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::WebhookId;

    /// Pins the engine clock's base before this runtime's paused clock moves, so that
    /// `advance` moves the engine clock by exactly as much (another test may set it later).
    async fn start_clock() {
        let _ = crate::clock::now();
        tokio::time::advance(Duration::from_millis(10)).await;
    }

    fn dlv(n: u64) -> DeliveryId {
        DeliveryId {
            seq: n,
            webhook: WebhookId(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_gets_its_burst_then_one_per_period() {
        start_clock().await;
        let limits = ManualRetryLimits::new();
        let a = AccountId::parse("acc_a").unwrap();
        for _ in 0..PER_DELIVERY_BURST {
            limits.check(&a, dlv(1)).unwrap();
        }
        let refused = limits.check(&a, dlv(1)).unwrap_err();
        assert_eq!(refused.scope, Scope::Delivery);
        assert_eq!(
            u64::from(refused.retry_after_secs),
            PER_DELIVERY_PERIOD.as_secs()
        );
        // Another delivery of the same account is not held up.
        limits.check(&a, dlv(2)).unwrap();
        tokio::time::advance(PER_DELIVERY_PERIOD).await;
        limits.check(&a, dlv(1)).unwrap();
        assert!(limits.check(&a, dlv(1)).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_account_is_paced_across_its_deliveries_and_others_are_not() {
        start_clock().await;
        let limits = ManualRetryLimits::new();
        let a = AccountId::parse("acc_a").unwrap();
        let b = AccountId::parse("acc_b").unwrap();
        for n in 0..u64::from(PER_ACCOUNT_BURST) {
            limits.check(&a, dlv(n)).unwrap();
        }
        let refused = limits.check(&a, dlv(10_000)).unwrap_err();
        assert_eq!(
            (refused.scope, refused.retry_after_secs),
            (Scope::Account, 1)
        );
        limits.check(&b, dlv(20_000)).unwrap();
        // 20 a second come back.
        tokio::time::advance(Duration::from_secs(1)).await;
        for n in 0..u64::from(PER_ACCOUNT_PER_SECOND) {
            limits.check(&a, dlv(30_000 + n)).unwrap();
        }
        assert!(limits.check(&a, dlv(40_000)).is_err());
    }
}
