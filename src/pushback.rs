//! Push-back: how far deliveries lag behind ingest, and holding new events while they lag.
//!
//! When producers offer more fan-out than the engine can deliver, accepting everything only
//! turns into lag: every event waits behind the backlog, the lockdown alert with the rest. So
//! the engine measures its *delivery lag* and, past `delivery.max_lag`, holds new events
//! before they are committed (the producer's request simply takes longer — closed-loop
//! producers slow down to the rate the engine delivers) for up to `delivery.max_lag_hold`,
//! then refuses them with `503 deliveries_lagging` and `Retry-After`. Events of
//! `delivery.priority_events` are never held.
//!
//! The lag is the age of the oldest work the engine itself still owes, taken from three
//! places, each published here by its single owner:
//! - the fan-out queue: the commit time of the oldest committed event whose deliveries are
//!   not written yet — the committer notes each batch it queues for the fan-out thread
//!   ([`Lag::fanout_queued`]), the fan-out thread each one it has written
//!   ([`Lag::fanout_written`]);
//! - the scheduler, while due entries wait for room in the dispatcher's queue: the due time of
//!   the oldest ([`Lag::dispatch_waiting`]);
//! - the dispatcher, while its queue is not empty: the due time of the entry it took last
//!   ([`Lag::dispatching`]) — it waits there for the engine's in-flight slots.
//!
//! First attempts are due from their event's commit, so the lag counts from the 202.
//!
//! Those three hold every account's ingest. A fourth part is per account: the due time of its
//! oldest delivery waiting behind the slots *because of the engine* — for one of the engine's
//! slots, or behind its webhook's adaptive limit while the endpoint is not what holds that
//! limit down ([`crate::dispatch::slots`] decides, [`Lag::webhooks_waiting`] publishes every
//! few ms). It holds only that account's ingest: account B is never held for account A's
//! endpoint. A delivery waiting behind an endpoint that refuses (429, 5xx, timeouts) or behind
//! its webhook's own `max_concurrency` is the endpoint's wait: it holds nobody, and the
//! account's quota (`delivery.max_scheduled_per_account`) bounds it. A delivery deferred by
//! its account's plan rate is due at its rate slot, so a slow plan holds nobody either.
//!
//! The stages are instantaneous (a stalled stage shows its age growing, not its last
//! sample), read with a few atomic loads and one map lookup per account of the request. A
//! held request looks again every 5 ms (`CHECK_EVERY`); the refusal carries
//! `Retry-After: 1`. Only a request whose events are all priority events skips the hold.
//!
//! A rising response time alone shrinks a webhook's limit but does not make the wait behind it
//! the endpoint's: on a shared box the engine's own CPU contention inflates response times,
//! and exempting that wait would let the backlog (and the lag) grow without bound — what
//! issue 20 set out to end.
//!
//! **Why (issue 12).** What bounds deliveries while ingest runs is the single delivery writer.
//! Without push-back (`delivery.max_lag = "0s"`), closed-loop producers with 10 webhooks offer
//! ~43 k deliveries/s; the writer then spends its time on creates (4 tree writes per delivery:
//! record, two log indexes, schedule entry) rather than outcomes (attempt, record, schedule
//! removal), so deliveries during ingest fell to ~6.4 k/s while the backlog and the lag grew
//! without bound (9.5 s p99 after 5 s). sled copies a tree node on every write (a leaf holds
//! ≤ 16 entries, and the rightmost leaf of a sequential key splits every ~8 inserts, cloning
//! its parent): each write costs microseconds, and the writer is one thread. So ingest is
//! admitted at the rate deliveries go. (Held deliveries, `store/embedded/held.rs`, have since
//! cut a delivery's writes; the writer is still the bound.)
//!
//! **The threshold.** The hold overshoots by the pipeline's delay — a release lets through
//! what the held and the new requests carry before the lag shows again — so a lower threshold
//! both accepts more and lags less (10 webhooks, 64 connections: `max_lag` 500 / 200 / 100 /
//! 50 ms → 202 → arrival p99 2.1 / 1.5 / 0.94 / 0.37 s). The default was 50 ms, ten times the
//! engine's unloaded commit → dispatch time; issue 20 lowered it to 20 ms, since with the
//! per-account part a slow sibling's backlog put 105–125 ms p99 on its account's fast
//! webhooks at 50 ms, 68 ms at 20 ms (README, *Performance*, has both sides of the trade and
//! `--max-lag 0s`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::clock;
use crate::ids::AccountId;

/// The engine's delivery lag, published by the committer, the fan-out thread, the scheduler
/// and the dispatcher.
#[derive(Debug, Default)]
pub struct Lag {
    /// Commit time (unix ms) of the first event of each batch queued for fan-out and not yet
    /// written, oldest first. One push and one pop per group commit.
    fanout_queue: Mutex<VecDeque<u64>>,
    /// Due time (unix ms) of the oldest entry waiting in the scheduler for room in the
    /// dispatcher's queue; 0 when none waits.
    dispatch_since: AtomicU64,
    /// Due time (unix ms) of the entry the dispatcher took last, while its queue is not
    /// empty; 0 when it is idle.
    dispatching_since: AtomicU64,
    /// Per account, the due time (unix ms) of its oldest delivery waiting behind the slots
    /// because of the engine; replaced whole by each sample (readers clone the `Arc`).
    webhooks: RwLock<Arc<HashMap<AccountId, u64>>>,
    /// The oldest of `webhooks` (0: none), for the engine-wide gauge.
    webhooks_oldest: AtomicU64,
    /// The due time of the oldest delivery waiting behind any webhook's slots, for any reason
    /// (0: none), and the attempts in flight: what the operator's gauges show.
    backlog_since: AtomicU64,
    in_flight: AtomicU64,
}

/// Ingest was held for `delivery.max_lag_hold` and the lag did not come down.
#[derive(Debug, thiserror::Error)]
#[error("deliveries lag {lag_ms} ms behind ingest (delivery.max_lag = {max_ms} ms); retry shortly")]
pub struct Lagging {
    pub lag_ms: u64,
    pub max_ms: u64,
}

impl Lag {
    /// The committer queued a batch of events, the first committed at `commit_ms`.
    pub fn fanout_queued(&self, commit_ms: u64) {
        self.queue().push_back(commit_ms);
    }

    /// The fan-out thread wrote the deliveries of the `batches` oldest queued batches.
    pub fn fanout_written(&self, batches: usize) {
        let mut q = self.queue();
        let n = batches.min(q.len());
        q.drain(..n);
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        self.fanout_queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The oldest due entry waiting for the dispatcher (`None`: none waits).
    pub fn dispatch_waiting(&self, since_ms: Option<u64>) {
        let v = since_ms.map_or(0, |s| s.max(1));
        // Skips the store when nothing changed: the scheduler calls this on every step.
        if self.dispatch_since.load(Ordering::Relaxed) != v {
            self.dispatch_since.store(v, Ordering::Relaxed);
        }
    }

    /// The dispatcher took an entry due at `since_ms` (`None`: its queue is empty).
    pub fn dispatching(&self, since_ms: Option<u64>) {
        self.dispatching_since
            .store(since_ms.map_or(0, |s| s.max(1)), Ordering::Relaxed);
    }

    /// Each account's oldest delivery waiting behind the slots because of the engine (see
    /// the module docs), as sampled by the dispatcher.
    pub fn webhooks_waiting(&self, waits: HashMap<AccountId, u64>) {
        let oldest = waits.values().copied().min().unwrap_or(0);
        self.webhooks_oldest.store(oldest, Ordering::Relaxed);
        let unchanged = waits.is_empty() && self.accounts().is_empty();
        if !unchanged {
            *self.webhooks.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(waits);
        }
    }

    /// The dispatcher's sample of its slots: the oldest waiting delivery of any webhook and
    /// the attempts in flight.
    pub fn slots_sampled(&self, oldest_ms: Option<u64>, in_flight: u32) {
        self.backlog_since
            .store(oldest_ms.map_or(0, |s| s.max(1)), Ordering::Relaxed);
        self.in_flight.store(in_flight as u64, Ordering::Relaxed);
    }

    /// How long the oldest delivery waiting behind any webhook's slots has waited at
    /// `now_ms` (0: none waits), and the attempts in flight.
    pub fn slots(&self, now_ms: u64) -> (u64, u64) {
        let since = self.backlog_since.load(Ordering::Relaxed);
        let age = if since == 0 {
            0
        } else {
            now_ms.saturating_sub(since)
        };
        (age, self.in_flight.load(Ordering::Relaxed))
    }

    fn accounts(&self) -> Arc<HashMap<AccountId, u64>> {
        self.webhooks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many ms the oldest owed work has waited, at `now_ms`, engine-wide (every
    /// account's waits behind the slots included).
    pub fn current(&self, now_ms: u64) -> u64 {
        self.stages(now_ms)
            .into_iter()
            .map(|(_, ms)| ms)
            .max()
            .unwrap_or(0)
    }

    /// The lag that holds ingest for `accounts`: the engine-wide stages and those accounts'
    /// own waits behind the slots.
    pub fn current_for(&self, accounts: &[&AccountId], now_ms: u64) -> u64 {
        let shared = self.stages(now_ms)[..3]
            .iter()
            .map(|(_, ms)| *ms)
            .max()
            .unwrap_or(0);
        let waits = self.accounts();
        if waits.is_empty() {
            return shared;
        }
        accounts
            .iter()
            .filter_map(|a| waits.get(*a))
            .map(|since| now_ms.saturating_sub(*since))
            .fold(shared, u64::max)
    }

    /// The lag of each stage at `now_ms`, in ms: fan-out (committed events whose deliveries
    /// are not written), scheduler (due entries waiting for room in the dispatcher's queue),
    /// dispatcher (its queue) and slots (the oldest wait behind the slots that is the
    /// engine's, of any account).
    pub fn stages(&self, now_ms: u64) -> [(&'static str, u64); 4] {
        let age = |since: u64| {
            if since == 0 {
                0
            } else {
                now_ms.saturating_sub(since)
            }
        };
        let fanout = self.queue().front().copied().unwrap_or(0);
        [
            ("fanout", age(fanout)),
            (
                "scheduler",
                age(self.dispatch_since.load(Ordering::Relaxed)),
            ),
            (
                "dispatcher",
                age(self.dispatching_since.load(Ordering::Relaxed)),
            ),
            ("slots", age(self.webhooks_oldest.load(Ordering::Relaxed))),
        ]
    }

    /// Waits while the lag that holds `accounts` is over `max` (checking every few ms), for
    /// at most `hold`. `max` of zero turns push-back off.
    pub async fn hold(
        &self,
        accounts: &[&AccountId],
        max: Duration,
        hold: Duration,
    ) -> Result<(), Lagging> {
        let max_ms = max.as_millis() as u64;
        if max_ms == 0 || self.current_for(accounts, clock::now_ms()) <= max_ms {
            return Ok(());
        }
        metrics::counter!("kyberhook_ingest_held_total").increment(1);
        let deadline = tokio::time::Instant::now() + hold;
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let lag_ms = self.current_for(accounts, clock::now_ms());
            if lag_ms <= max_ms {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                metrics::counter!("kyberhook_ingest_lag_refusals_total").increment(1);
                return Err(Lagging { lag_ms, max_ms });
            }
        }
    }
}

/// How often a held request looks at the lag again.
const CHECK_EVERY: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_is_the_age_of_the_oldest_owed_work() {
        let lag = Lag::default();
        assert_eq!(lag.current(10_000), 0);
        lag.fanout_queued(9_000);
        lag.fanout_queued(9_500);
        assert_eq!(lag.current(10_000), 1_000);
        lag.fanout_written(1);
        assert_eq!(lag.current(10_000), 500);
        lag.dispatch_waiting(Some(7_500));
        assert_eq!(lag.current(10_000), 2_500);
        lag.dispatch_waiting(None);
        lag.fanout_written(5);
        lag.dispatching(Some(9_900));
        assert_eq!(lag.current(10_000), 100);
        lag.dispatching(None);
        assert_eq!(lag.current(10_000), 0);
        // A due time in the future (clock skew between stages) is no lag.
        lag.dispatch_waiting(Some(20_000));
        assert_eq!(lag.current(10_000), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ingest_is_held_while_deliveries_lag_then_refused() {
        let lag = std::sync::Arc::new(Lag::default());
        let max = Duration::from_millis(500);
        let hold = Duration::from_secs(2);
        // No lag: no hold.
        lag.hold(&[], max, hold).await.unwrap();
        // Lagging since "now - 1 s": held until the lag is cleared.
        lag.fanout_queued(clock::now_ms() - 1_000);
        let held = tokio::spawn({
            let lag = lag.clone();
            async move { lag.hold(&[], max, hold).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!held.is_finished(), "released while still lagging");
        lag.fanout_written(1);
        held.await.unwrap().unwrap();
        // Lagging for longer than the hold: refused, naming the lag.
        lag.dispatch_waiting(Some(clock::now_ms() - 1_000));
        let err = lag.hold(&[], max, hold).await.unwrap_err();
        assert!(err.lag_ms >= 2_000, "{err}");
        // Turned off: never held.
        lag.dispatch_waiting(None);
        lag.hold(&[], Duration::ZERO, hold).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_accounts_own_waits_hold_only_that_account() {
        let lag = Lag::default();
        let (a, b) = (
            AccountId::parse("acme").unwrap(),
            AccountId::parse("globex").unwrap(),
        );
        let now = clock::now_ms();
        lag.webhooks_waiting(HashMap::from([(a.clone(), now - 2_000)]));
        assert_eq!(lag.current_for(&[&a], now), 2_000);
        assert_eq!(lag.current_for(&[&b], now), 0);
        assert_eq!(lag.current_for(&[&b, &a], now), 2_000);
        assert_eq!(lag.current(now), 2_000, "engine-wide, it counts");
        let max = Duration::from_millis(50);
        let hold = Duration::from_millis(200);
        lag.hold(&[&b], max, hold).await.unwrap();
        assert!(lag.hold(&[&a], max, hold).await.is_err());
        lag.webhooks_waiting(HashMap::new());
        assert_eq!(lag.current_for(&[&a], clock::now_ms()), 0);
    }
}
