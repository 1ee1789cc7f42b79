//! Delivery statistics: per webhook, how its attempts ended and how fast its endpoint answered,
//! in hourly buckets that survive a restart and follow retention; and the engine-wide figures of
//! the operator overview ([`live`]).
//!
//! Data enters from the delivery writer: for every attempt outcome it writes (test sends
//! excluded), it collects an [`AttemptStat`] — webhook, attempt time, [`Outcome`], response
//! time — and the drain's stats are written with the drain (`Storage::add_stats`, tree `stats`,
//! one read-modify-write per webhook and hour per drain). A bucket ([`Counts`]) holds the count
//! of each outcome and a log-linear histogram of response times ([`Histogram`], ≤ 6.25 %
//! relative error), so hours merge into days exactly and percentiles come out of the merge.
//! Data leaves as [`Bucket`]s of a [`Window`] (the last 24 hours by hour, or the last 7 days by
//! UTC day), read by the API (`GET …/webhooks/{id}/stats`) and the dashboard's charts.
//!
//! The counts are of *attempts*, by the hour they were made: an endpoint that failed from 14:00
//! to 16:00 shows failures in those hours even after the retries went through. `delivered` is
//! an attempt that succeeded, `retrying` one that failed with another attempt scheduled,
//! `failed` one that failed and ended its delivery. So for deliveries that took one attempt
//! each, the counts equal the delivery log's by status.

pub mod live;

use serde::{Deserialize, Serialize};

use crate::delivery::Settled;
use crate::ids::WebhookId;
use crate::model::AttemptRecord;

pub const HOUR_MS: u64 = 3_600_000;
pub const DAY_MS: u64 = 24 * HOUR_MS;

/// How an attempt ended, as the charts show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Retrying,
    Failed,
}

/// One attempt's contribution to its webhook's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptStat {
    pub webhook: WebhookId,
    pub at_ms: u64,
    pub outcome: Outcome,
    pub response_time_ms: u64,
}

impl AttemptStat {
    /// The statistic of an attempt the delivery writer settled; `None` when nothing was
    /// written for it (its delivery or webhook is gone).
    pub fn of(
        webhook: WebhookId,
        attempt: &AttemptRecord,
        success: bool,
        settled: &Settled,
    ) -> Option<AttemptStat> {
        let outcome = match settled {
            Settled::Gone => return None,
            _ if success => Outcome::Delivered,
            Settled::Failed => Outcome::Failed,
            // A manual retry queued during a failed attempt: another attempt is coming.
            _ => Outcome::Retrying,
        };
        Some(AttemptStat {
            webhook,
            at_ms: attempt.at_ms,
            outcome,
            response_time_ms: attempt.response_time_ms,
        })
    }

    /// The hour (unix ms / [`HOUR_MS`]) whose bucket it counts in.
    pub fn hour(&self) -> u64 {
        self.at_ms / HOUR_MS
    }
}

/// A sparse log-linear histogram of response times in ms: exact below 32 ms, then 16
/// sub-buckets per power of two. Entries are (bucket index, count), sorted by index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram(pub Vec<(u16, u32)>);

const EXACT: u64 = 32;
const SUB_BITS: u32 = 4;

/// The histogram bucket of `ms`.
pub fn bucket_of(ms: u64) -> u16 {
    if ms < EXACT {
        return ms as u16;
    }
    let e = 63 - ms.leading_zeros(); // floor(log2 ms), ≥ 5
    let sub = (ms >> (e - SUB_BITS)) & 0xf;
    (EXACT + u64::from(e - 5) * 16 + sub) as u16
}

/// The smallest and largest ms of bucket `i`.
pub fn bucket_bounds(i: u16) -> (u64, u64) {
    let i = u64::from(i);
    if i < EXACT {
        return (i, i);
    }
    let e = (i - EXACT) / 16 + 5;
    let sub = (i - EXACT) % 16;
    let width = 1u64 << (e - u64::from(SUB_BITS));
    let lo = (16 + sub) * width;
    (lo, lo + width - 1)
}

impl Histogram {
    pub fn record(&mut self, ms: u64, n: u32) {
        let b = bucket_of(ms);
        match self.0.binary_search_by_key(&b, |(i, _)| *i) {
            Ok(pos) => self.0[pos].1 = self.0[pos].1.saturating_add(n),
            Err(pos) => self.0.insert(pos, (b, n)),
        }
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (b, n) in &other.0 {
            let (lo, _) = bucket_bounds(*b);
            self.record(lo, *n);
        }
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|(_, n)| u64::from(*n)).sum()
    }

    /// The `p`-quantile (0 < p ≤ 1) by nearest rank: the middle of the bucket holding it
    /// (exact below 32 ms). `None` when empty.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((p * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (b, c) in &self.0 {
            seen += u64::from(*c);
            if seen >= rank {
                let (lo, hi) = bucket_bounds(*b);
                return Some(lo + (hi - lo) / 2);
            }
        }
        None
    }
}

/// One stored bucket: a webhook's attempts in one hour (or, merged, one day).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub delivered: u64,
    pub retrying: u64,
    pub failed: u64,
    pub latency: Histogram,
}

impl Counts {
    pub fn add(&mut self, s: &AttemptStat) {
        match s.outcome {
            Outcome::Delivered => self.delivered += 1,
            Outcome::Retrying => self.retrying += 1,
            Outcome::Failed => self.failed += 1,
        }
        self.latency.record(s.response_time_ms, 1);
    }

    pub fn merge(&mut self, other: &Counts) {
        self.delivered += other.delivered;
        self.retrying += other.retrying;
        self.failed += other.failed;
        self.latency.merge(&other.latency);
    }

    pub fn attempts(&self) -> u64 {
        self.delivered + self.retrying + self.failed
    }
}

/// Sums a drain's statistics per (webhook, hour), in key order.
pub fn aggregate(stats: &[AttemptStat]) -> Vec<((WebhookId, u64), Counts)> {
    let mut by: std::collections::BTreeMap<(WebhookId, u64), Counts> = Default::default();
    for s in stats {
        by.entry((s.webhook, s.hour())).or_default().add(s);
    }
    by.into_iter().collect()
}

/// The span a statistics query covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last 24 hours, one bucket per hour (the current hour last).
    Day,
    /// The last 7 days, one bucket per UTC day (today last).
    Week,
}

impl Window {
    pub fn parse(s: &str) -> Option<Window> {
        match s {
            "24h" => Some(Window::Day),
            "7d" => Some(Window::Week),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Day => "24h",
            Window::Week => "7d",
        }
    }

    pub fn bucket_ms(self) -> u64 {
        match self {
            Window::Day => HOUR_MS,
            Window::Week => DAY_MS,
        }
    }

    pub fn buckets(self) -> u64 {
        match self {
            Window::Day => 24,
            Window::Week => 7,
        }
    }

    /// The first hour (unix hours) the window covers at `now_ms`.
    pub fn first_hour(self, now_ms: u64) -> u64 {
        let first_start = (now_ms / self.bucket_ms())
            .saturating_sub(self.buckets() - 1)
            .saturating_mul(self.bucket_ms());
        first_start / HOUR_MS
    }
}

/// One bucket of a window, as the API and the charts show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub start_ms: u64,
    pub delivered: u64,
    pub retrying: u64,
    pub failed: u64,
    pub p50_ms: Option<u64>,
    pub p95_ms: Option<u64>,
}

impl Bucket {
    pub fn attempts(&self) -> u64 {
        self.delivered + self.retrying + self.failed
    }
}

/// The window's buckets at `now_ms`, oldest first, every one present (zero when nothing was
/// attempted), from the stored hourly buckets `hourly` (unix hour, counts).
pub fn window_buckets(hourly: &[(u64, Counts)], window: Window, now_ms: u64) -> Vec<Bucket> {
    let size = window.bucket_ms();
    let last = now_ms / size;
    let first = last.saturating_sub(window.buckets() - 1);
    let mut merged: Vec<Counts> = vec![Counts::default(); (last - first + 1) as usize];
    for (hour, counts) in hourly {
        let b = hour * HOUR_MS / size;
        if (first..=last).contains(&b) {
            merged[(b - first) as usize].merge(counts);
        }
    }
    merged
        .into_iter()
        .enumerate()
        .map(|(i, c)| Bucket {
            start_ms: (first + i as u64) * size,
            delivered: c.delivered,
            retrying: c.retrying,
            failed: c.failed,
            p50_ms: c.latency.percentile(0.50),
            p95_ms: c.latency.percentile(0.95),
        })
        .collect()
}

/// Attempts that succeeded, of all attempts in `buckets`, in percent (`None`: no attempt).
pub fn success_rate(buckets: &[Bucket]) -> Option<f64> {
    let all: u64 = buckets.iter().map(Bucket::attempts).sum();
    let ok: u64 = buckets.iter().map(|b| b.delivered).sum();
    (all > 0).then(|| ok as f64 * 100.0 / all as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(hook: u64, at_ms: u64, outcome: Outcome, ms: u64) -> AttemptStat {
        AttemptStat {
            webhook: WebhookId(hook),
            at_ms,
            outcome,
            response_time_ms: ms,
        }
    }

    #[test]
    fn histogram_buckets_cover_every_value_once_within_a_sixteenth() {
        let mut last_hi = None;
        for i in 0..600u16 {
            let (lo, hi) = bucket_bounds(i);
            if let Some(prev) = last_hi {
                assert_eq!(lo, prev + 1, "bucket {i} starts where {} ended", i - 1);
            }
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi), i);
            assert!(
                (hi - lo) as f64 <= lo as f64 / 16.0,
                "bucket {i}: {lo}..{hi}"
            );
            last_hi = Some(hi);
        }
        assert_eq!(bucket_of(u64::MAX), bucket_of(u64::MAX - 1));
    }

    #[test]
    fn percentiles_are_exact_below_32_ms_and_close_above() {
        let mut h = Histogram::default();
        for ms in 1..=20 {
            h.record(ms, 1);
        }
        assert_eq!(h.percentile(0.5), Some(10));
        assert_eq!(h.percentile(0.95), Some(19));
        let mut h = Histogram::default();
        for ms in [100, 200, 300, 400, 5000] {
            h.record(ms, 1);
        }
        let p50 = h.percentile(0.5).unwrap();
        assert!((290..=310).contains(&p50), "{p50}");
        let p95 = h.percentile(0.95).unwrap();
        assert!((4700..=5300).contains(&p95), "{p95}");
        assert_eq!(Histogram::default().percentile(0.5), None);
    }

    #[test]
    fn merging_hours_equals_counting_the_day_at_once() {
        let mut a = Counts::default();
        let mut b = Counts::default();
        let mut all = Counts::default();
        for (i, ms) in [3u64, 40, 40, 900, 12_000, 7].iter().enumerate() {
            let s = stat(1, 0, Outcome::Delivered, *ms);
            if i % 2 == 0 { &mut a } else { &mut b }.add(&s);
            all.add(&s);
        }
        a.merge(&b);
        assert_eq!(a, all);
    }

    #[test]
    fn a_window_has_every_bucket_oldest_first_and_merges_hours_into_days() {
        let now = 100 * DAY_MS + 5 * HOUR_MS + 17;
        let hour = |h: u64| now / HOUR_MS - h;
        let mut c1 = Counts::default();
        c1.add(&stat(1, 0, Outcome::Delivered, 10));
        let mut c2 = Counts::default();
        c2.add(&stat(1, 0, Outcome::Failed, 20));
        c2.add(&stat(1, 0, Outcome::Retrying, 30));
        // Too old for the 24 h window, inside the 7 d one.
        let mut c3 = Counts::default();
        c3.add(&stat(1, 0, Outcome::Delivered, 5));
        let stored = vec![(hour(30), c3), (hour(2), c1), (hour(0), c2)];
        let day = window_buckets(&stored, Window::Day, now);
        assert_eq!(day.len(), 24);
        assert_eq!(day[23].start_ms, now / HOUR_MS * HOUR_MS);
        assert_eq!((day[23].failed, day[23].retrying), (1, 1));
        assert_eq!(day[21].delivered, 1);
        assert_eq!(day.iter().map(Bucket::attempts).sum::<u64>(), 3);
        assert_eq!(day[0].p50_ms, None);
        let week = window_buckets(&stored, Window::Week, now);
        assert_eq!(week.len(), 7);
        assert_eq!(week[6].start_ms, 100 * DAY_MS);
        assert_eq!(week.iter().map(Bucket::attempts).sum::<u64>(), 4);
        assert_eq!(
            week[4].delivered, 1,
            "05:00 less 30 h is the day before yesterday"
        );
        assert_eq!(success_rate(&day), Some(100.0 / 3.0));
        assert_eq!(Window::Day.first_hour(now), hour(23));
        assert_eq!(Window::Week.first_hour(now), (94 * DAY_MS) / HOUR_MS);
    }

    #[test]
    fn outcomes_follow_what_the_writer_settled() {
        let a = AttemptRecord {
            number: 1,
            at_ms: 7_200_001,
            response_code: Some(500),
            response_time_ms: 12,
            response_headers: Vec::new(),
            response_body: String::new(),
            error: None,
            timestamp: 0,
            signature: String::new(),
        };
        let of = |success, s: Settled| AttemptStat::of(WebhookId(1), &a, success, &s);
        assert_eq!(
            of(true, Settled::Delivered).unwrap().outcome,
            Outcome::Delivered
        );
        assert_eq!(
            of(false, Settled::Retrying { next_ms: 9 }).unwrap().outcome,
            Outcome::Retrying
        );
        assert_eq!(of(false, Settled::Failed).unwrap().outcome, Outcome::Failed);
        assert_eq!(
            of(true, Settled::RetryQueued { next_ms: 9 })
                .unwrap()
                .outcome,
            Outcome::Delivered
        );
        assert_eq!(
            of(false, Settled::RetryQueued { next_ms: 9 })
                .unwrap()
                .outcome,
            Outcome::Retrying
        );
        assert_eq!(of(false, Settled::Gone), None);
        assert_eq!(of(true, Settled::Delivered).unwrap().hour(), 2);
        let agg = aggregate(&[
            stat(2, HOUR_MS, Outcome::Delivered, 1),
            stat(1, 5, Outcome::Failed, 1),
            stat(2, HOUR_MS + 9, Outcome::Failed, 1),
        ]);
        assert_eq!(agg.len(), 2);
        assert_eq!(agg[0].0, (WebhookId(1), 0));
        assert_eq!(agg[1].1.attempts(), 2);
    }
}
