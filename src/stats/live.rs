//! The engine's figures of the last hour, per minute, in memory: events ingested, attempts by
//! outcome, the largest delivery lag and the deliveries waiting — the trends of the operator
//! overview (`/ui/admin/overview`, `GET /v1/admin/stats`).
//!
//! Counts enter where the store writes them (events as the committer appends them, attempts as
//! the delivery writer writes their outcomes: `Storage::append_events_owing`,
//! `Storage::add_stats`); the lag and the waiting deliveries are sampled every few seconds by the
//! task [`spawn_sampler`] starts, from their owners (`pushback::Lag`, the scheduler). Nothing is
//! stored: after a restart the trend starts again (the per-webhook statistics, which must
//! survive, are in the store).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock;
use crate::scheduler::SchedulerHandle;
use crate::store::Storage;

/// Minutes kept: the last hour and the minute in progress.
pub const MINUTES: usize = 61;
const MINUTE_MS: u64 = 60_000;
/// How often the sampler reads the lag and the waiting deliveries.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// One minute of the engine's activity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Minute {
    /// Unix minutes.
    pub minute: u64,
    pub events: u64,
    pub delivered: u64,
    pub failed: u64,
    /// The largest delivery lag sampled in the minute (ms).
    pub lag_ms: u64,
    /// Deliveries waiting for an attempt at the minute's last sample.
    pub waiting: u64,
}

/// The last hour, per minute. One std mutex, held for a few field updates only.
pub struct Live {
    started_ms: u64,
    minutes: Mutex<VecDeque<Minute>>,
}

impl Default for Live {
    fn default() -> Self {
        Live::new(clock::now_ms())
    }
}

impl Live {
    pub fn new(started_ms: u64) -> Live {
        Live {
            started_ms,
            minutes: Mutex::new(VecDeque::with_capacity(MINUTES + 1)),
        }
    }

    /// When this engine started (unix ms).
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    fn with_minute(&self, now_ms: u64, f: impl FnOnce(&mut Minute)) {
        let minute = now_ms / MINUTE_MS;
        let mut q = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        // Minutes only move forward; a caller with an older clock reading adds to the newest.
        if q.back().map_or(true, |m| m.minute < minute) {
            q.push_back(Minute {
                minute,
                ..Default::default()
            });
            while q.len() > MINUTES {
                q.pop_front();
            }
        }
        if let Some(m) = q.back_mut() {
            f(m);
        }
    }

    pub fn add_events(&self, now_ms: u64, n: u64) {
        self.with_minute(now_ms, |m| m.events += n);
    }

    /// Counts a batch of attempts into the minute now (delivered, and the rest as failed).
    pub fn count(&self, attempts: &[crate::stats::AttemptStat]) {
        if attempts.is_empty() {
            return;
        }
        let delivered = attempts
            .iter()
            .filter(|s| s.outcome == crate::stats::Outcome::Delivered)
            .count() as u64;
        self.add_attempts(
            clock::now_ms(),
            delivered,
            attempts.len() as u64 - delivered,
        );
    }

    pub fn add_attempts(&self, now_ms: u64, delivered: u64, failed: u64) {
        self.with_minute(now_ms, |m| {
            m.delivered += delivered;
            m.failed += failed;
        });
    }

    pub fn sample(&self, now_ms: u64, lag_ms: u64, waiting: u64) {
        self.with_minute(now_ms, |m| {
            m.lag_ms = m.lag_ms.max(lag_ms);
            m.waiting = waiting;
        });
    }

    /// The last 60 minutes at `now_ms`, oldest first, the one in progress last; every one
    /// present (zero when nothing happened or the engine was not running).
    pub fn last_hour(&self, now_ms: u64) -> Vec<Minute> {
        let current = now_ms / MINUTE_MS;
        let first = current.saturating_sub(59);
        let q = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        (first..=current)
            .map(|minute| {
                q.iter()
                    .find(|m| m.minute == minute)
                    .cloned()
                    .unwrap_or(Minute {
                        minute,
                        ..Default::default()
                    })
            })
            .collect()
    }
}

/// Samples the lag and the waiting deliveries into the store's [`Live`] every
/// [`SAMPLE_EVERY`] until aborted (at shutdown, with the engine's other background tasks).
pub fn spawn_sampler(
    store: Arc<dyn Storage>,
    scheduler: SchedulerHandle,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            let now = clock::now_ms();
            store.live().sample(
                now,
                scheduler.lag().current(now),
                scheduler.scheduled() as u64,
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_hour_is_sixty_whole_minutes_oldest_first() {
        let live = Live::new(0);
        let t0 = 1_000 * MINUTE_MS;
        live.add_events(t0 + 5, 30);
        live.add_events(t0 + 50_000, 12);
        live.add_attempts(t0 + 61_000, 40, 2);
        live.sample(t0 + 62_000, 800, 7);
        live.sample(t0 + 63_000, 300, 5);
        let hour = live.last_hour(t0 + MINUTE_MS + 5);
        assert_eq!(hour.len(), 60);
        assert_eq!(hour[59].minute, 1_001);
        assert_eq!((hour[58].minute, hour[58].events), (1_000, 42));
        assert_eq!((hour[59].delivered, hour[59].failed), (40, 2));
        assert_eq!((hour[59].lag_ms, hour[59].waiting), (800, 5));
        assert_eq!(
            hour[0],
            Minute {
                minute: 942,
                ..Default::default()
            }
        );
        // Old minutes fall out.
        live.add_events(t0 + 200 * MINUTE_MS, 1);
        let later = live.last_hour(t0 + 200 * MINUTE_MS);
        assert_eq!(later.iter().map(|m| m.events).sum::<u64>(), 1);
        assert_eq!(later[59].events, 1, "only the minute in progress");
        assert!(live.minutes.lock().unwrap().len() <= MINUTES);
    }
}
