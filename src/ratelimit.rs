//! Plan rate limits: how many deliveries per second one account's endpoints may receive, all
//! its webhooks together.
//!
//! The dispatcher asks [`RateLimits::admit`] before each attempt. An allowed attempt goes on;
//! one that is not gets a time slot of its own in the future, and the dispatcher parks it in the
//! timing wheel until then — nothing sleeps and nothing is dropped. Slots are handed out at the
//! plan's interval after the last one given, so a backlog of N deliveries is spread over N /
//! rate seconds instead of all waking at governor's earliest instant and mostly failing again.
//! Each account has its own governor limiter (GCRA) driven by the engine clock, so one
//! account's backlog never touches another's, and a plan change rebuilds the limiter at once.
//! Owned by the dispatcher task; no locks.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::{Quota, RateLimiter};

use crate::clock;
use crate::ids::AccountId;

/// governor's clock, reading the engine clock (so paused-time tests pace correctly too).
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineClock;

impl Clock for EngineClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        clock::now()
    }
}

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    EngineClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

struct Pace {
    per_second: u32,
    limiter: Limiter,
    /// The next free future slot (unix µs) for a deferred delivery.
    next_slot_us: u64,
    /// A priority delivery was promised the limiter's next free instant: ordinary deliveries
    /// that come due before this (unix µs) step behind it. Time-bounded, so a promise whose
    /// delivery never comes back (deleted meanwhile) holds nobody up for long.
    reserved_until_us: u64,
}

/// Whether an attempt may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Now,
    /// Not before this unix ms.
    At(u64),
}

#[derive(Default)]
pub struct RateLimits {
    accounts: HashMap<AccountId, Pace>,
}

impl RateLimits {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for one delivery of `account`, whose plan allows `per_second` (0: unlimited).
    ///
    /// A `priority` delivery (`delivery.priority_events`) takes the account's next rate slot:
    /// deferred, it is given the limiter's earliest instant instead of a place at the back of
    /// the line (`next_slot_us`), and *reserves* it until one interval past it: an ordinary
    /// delivery that comes due during a reservation is sent to the back of the line without
    /// consuming a token. So the plan's rate holds either way, and the reservation is bounded
    /// in time (a priority delivery deleted meanwhile holds nobody up). Which events are
    /// priority is `Config::is_priority`; an admitted priority job also joins the front of its
    /// webhook's queue, like a test send (`dispatch::slots`).
    pub fn admit(&mut self, account: &AccountId, per_second: u32, priority: bool) -> Admit {
        let Some(rate) = NonZeroU32::new(per_second) else {
            self.accounts.remove(account);
            return Admit::Now;
        };
        let now_us = clock::now().as_micros() as u64;
        let pace = match self.accounts.get_mut(account) {
            Some(p) if p.per_second == per_second => p,
            _ => {
                // Half the rate as burst keeps any one-second window under 1.5 × the rate.
                let burst = NonZeroU32::new(rate.get().div_ceil(2)).unwrap_or(NonZeroU32::MIN);
                let quota = Quota::per_second(rate).allow_burst(burst);
                self.accounts.insert(
                    account.clone(),
                    Pace {
                        per_second,
                        limiter: RateLimiter::direct_with_clock(quota, EngineClock),
                        next_slot_us: now_us,
                        reserved_until_us: 0,
                    },
                );
                self.accounts.get_mut(account).expect("just inserted")
            }
        };
        let interval = 1_000_000 / u64::from(rate.get());
        let check = if !priority && now_us < pace.reserved_until_us {
            None
        } else {
            Some(pace.limiter.check())
        };
        match check {
            Some(Ok(())) => Admit::Now,
            Some(Err(not_until)) if priority => {
                let slot = (not_until.earliest_possible().as_micros() as u64).max(now_us);
                // Until one interval past the slot, so the wheel's lateness does not let an
                // ordinary delivery take it first.
                pace.reserved_until_us = pace.reserved_until_us.max(slot + interval);
                Admit::At(slot.div_ceil(1000))
            }
            Some(Err(not_until)) => {
                let earliest = not_until.earliest_possible().as_micros() as u64;
                let slot = pace.next_slot_us.max(earliest).max(now_us);
                pace.next_slot_us = slot + interval;
                Admit::At(slot.div_ceil(1000))
            }
            None => {
                let slot = pace.next_slot_us.max(pace.reserved_until_us);
                pace.next_slot_us = slot + interval;
                Admit::At(slot.div_ceil(1000))
            }
        }
    }

    /// Forgets every account `keep` says no to (deleted ones): their limiters go.
    pub fn retain(&mut self, keep: impl Fn(&AccountId) -> bool) {
        self.accounts.retain(|a, _| keep(a));
    }

    /// How many accounts have a limiter.
    pub fn accounts(&self) -> usize {
        self.accounts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deleted_accounts_limiters_are_dropped() {
        let mut limits = RateLimits::new();
        let (a, b) = (
            AccountId::parse("acme").unwrap(),
            AccountId::parse("gone").unwrap(),
        );
        limits.admit(&a, 10, false);
        limits.admit(&b, 10, false);
        assert_eq!(limits.accounts(), 2);
        limits.retain(|acc| *acc == a);
        assert_eq!(limits.accounts(), 1);
        // The kept account keeps its pace: its next delivery this instant is deferred.
        for _ in 0..20 {
            limits.admit(&a, 10, false);
        }
        assert!(matches!(limits.admit(&a, 10, false), Admit::At(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn paces_one_account_and_spreads_its_backlog() {
        let mut limits = RateLimits::new();
        let a = AccountId::parse("acc_a").unwrap();
        let b = AccountId::parse("acc_b").unwrap();
        let t0 = clock::now_ms();
        let mut now = 0;
        let mut later = Vec::new();
        for _ in 0..40 {
            match limits.admit(&a, 10, false) {
                Admit::Now => now += 1,
                Admit::At(ms) => later.push(ms - t0),
            }
        }
        assert_eq!(now, 5, "the burst is half the rate");
        // The rest get distinct slots 100 ms apart: 35 more take 3.5 s.
        assert_eq!(later.len(), 35);
        for pair in later.windows(2) {
            assert!(pair[1] >= pair[0] + 99, "{later:?}");
        }
        assert!(*later.last().unwrap() >= 3_400);
        // Another account is untouched by a's backlog.
        assert_eq!(limits.admit(&b, 10, false), Admit::Now);
        // Unlimited plans always go.
        for _ in 0..1000 {
            assert_eq!(limits.admit(&b, 0, false), Admit::Now);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_priority_delivery_takes_the_next_slot_ahead_of_a_backlog() {
        let mut limits = RateLimits::new();
        let a = AccountId::parse("acc_a").unwrap();
        let t0 = clock::now_ms();
        let mut last = 0;
        for _ in 0..500 {
            if let Admit::At(ms) = limits.admit(&a, 10, false) {
                last = ms - t0;
            }
        }
        assert!(last >= 49_000, "the backlog spreads over ~50 s: {last}");
        let Admit::At(slot) = limits.admit(&a, 10, true) else {
            panic!("the burst is spent: a priority delivery waits for the next slot too")
        };
        assert!(
            slot - t0 <= 101,
            "the next slot, not the back of the line: {}",
            slot - t0
        );
        // An ordinary delivery due at that instant steps behind it ...
        tokio::time::sleep_until(clock::instant_at(slot)).await;
        assert!(matches!(limits.admit(&a, 10, false), Admit::At(ms) if ms - t0 > 49_000));
        // ... and the priority one goes.
        assert_eq!(limits.admit(&a, 10, true), Admit::Now);
        // The rate holds: no second token at the same instant.
        assert!(matches!(limits.admit(&a, 10, true), Admit::At(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deferred_delivery_is_admitted_at_its_slot_and_a_plan_change_applies_at_once() {
        let mut limits = RateLimits::new();
        let a = AccountId::parse("acc_a").unwrap();
        while limits.admit(&a, 2, false) == Admit::Now {}
        let Admit::At(slot) = limits.admit(&a, 2, false) else {
            panic!("expected a deferral")
        };
        tokio::time::sleep_until(clock::instant_at(slot)).await;
        assert_eq!(limits.admit(&a, 2, false), Admit::Now);
        // A faster plan: a new limiter with a fresh burst.
        assert_eq!(limits.admit(&a, 200, false), Admit::Now);
    }
}
