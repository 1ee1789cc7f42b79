//! Adaptive concurrency: how many attempts one webhook may have in flight.
//!
//! **Why (issue 20).** With a receiver in its own process (one thread, sharing the two cores),
//! an endpoint's answer time rose to 10–60 ms under load, and 64 fixed slots per webhook ×
//! that latency capped a webhook at a few thousand deliveries per second, below what ingest
//! accepted. The waits behind a webhook's slots were, by design, not the engine's lag, so
//! push-back never engaged and 202 → arrival reached 15–34 s. A fixed 1024 would have fixed
//! the bench and hammered slow customers.
//!
//! Each webhook's limit is a [`Controller`], an AIMD loop over response times after Vector's
//! adaptive request concurrency. Attempts enter with [`Controller::started`] and leave with
//! [`Controller::finished`] and a [`Signal`] read off their outcome; once per *window* (one
//! smoothed round-trip time) the controller decides:
//!
//! - **grow** by `max(1, limit / 16)` ([`GROWTH`]) — or double while below half of what it
//!   was when the last refusals began (an endpoint recovering) — when the limit was reached
//!   in the window, nothing signalled back-pressure and the window's mean response time is
//!   not above the smoothed mean;
//! - **shrink** to `limit × 0.9` (at least one less, never below 1) at the first refusal of a
//!   window (429, 408, 5xx but 501, a timeout, a connection error), or at its end when the
//!   window's mean response time rose 2.5 standard deviations above the smoothed mean.
//!
//! The window's mean is then folded into the EWMA (α 0.4) of the mean and variance of 2xx
//! response times, and the next window starts. A window is one smoothed response time,
//! clamped to 5 ms … 1 s: sub-millisecond loopback answers would decide on one sample, and a
//! slow endpoint still gets decisions. `reached_limit` keeps idle webhooks from drifting up.
//! Where this departs from Vector, and why:
//!
//! - growth is `limit / 16`, not +1 (see `GROWTH`: ~20 windows instead of ~160 from 64 to
//!   the ~220 a 13 ms endpoint needs at 17 k/s, each step still smaller than one decrease);
//! - a refusal shrinks at once, at most once per window (Vector waits for the window's end):
//!   an endpoint that starts answering 503 sees its concurrency halve within ~7 of its round
//!   trips;
//! - **slow start after refusals**: when an episode of refusals begins, half the limit is
//!   noted; once they end, the limit doubles per window back up to it (an endpoint back from
//!   an outage at limit 1 gets to 128 in 7 windows), then probes in small steps again.
//!   Without it a recovered endpoint stayed near 27 in flight 5 s after recovering (load
//!   bench, case c).
//!
//! 4xx, 501 and 3xx answers are neutral. Response times are timed per attempt (`client`
//! measures send → answer), never per delivery, so a backoff never hides back-pressure. The
//! initial limit is 64, the old fixed cap, so no endpoint does worse than before (Vector added
//! `initial_concurrency` for the same reason); the ceiling is the smaller of
//! `delivery.max_in_flight_per_webhook` (default 512) and the webhook's `max_concurrency`. A
//! cap change applies at the next attempt's end, and a lifted or raised cap lets a limit it
//! pinned go back to 64 at once. [`super::slots`] keeps each controller through idle gaps of
//! up to 60 s, then drops it (so deleted webhooks' state goes too).
//!
//! The state is plain data and time comes in as an argument, so every decision is tested
//! here without a clock or a network. [`Controller::held_down`] tells push-back whether the
//! endpoint's own refusals are what keeps the limit down (then waiting is the endpoint's
//! doing, not the engine's).

use std::time::Duration;

/// The multiplicative decrease (Vector's default: ×0.5 was found too harsh).
const DECREASE: f64 = 0.9;
/// Smoothing of the response-time mean and variance.
const EWMA_ALPHA: f64 = 0.4;
/// How far above the smoothed mean (in standard deviations) a window's mean response time
/// must be to count as the endpoint slowing down under load.
const RTT_DEVIATIONS: f64 = 2.5;
/// Windows never end faster than this: sub-millisecond loopback answers would otherwise make
/// decisions on one or two samples.
const MIN_WINDOW: Duration = Duration::from_millis(5);
/// Nor slower than this, so that a slow endpoint (seconds per answer) still gets decisions.
const MAX_WINDOW: Duration = Duration::from_secs(1);
/// An endpoint that refused within this long is still the one holding the limit down.
const HELD_DOWN_FOR: Duration = Duration::from_secs(2);
/// Growth per window is `max(1, limit / GROWTH)`: +1 per window (Vector) takes ~160 windows
/// to go from 64 to the ~220 in flight a 13 ms endpoint needs at 17 k/s; limit/16 takes ~20,
/// and is still a small step (6 %) next to the 10 % a single decrease takes back.
const GROWTH: u32 = 16;

/// What an attempt's outcome says about the endpoint's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A 2xx: its response time is a sample of the endpoint's latency.
    Success,
    /// 429, 408, 5xx except 501, a timeout or a connection error: slow down.
    BackPressure,
    /// Anything else (a 4xx, a 501, a redirect): says nothing about load.
    Neutral,
}

impl Signal {
    /// Classifies an attempt by its HTTP status (`None`: no answer — timed out, refused,
    /// reset).
    pub fn of(status: Option<u16>) -> Signal {
        match status {
            None => Signal::BackPressure,
            Some(s) if (200..300).contains(&s) => Signal::Success,
            Some(429 | 408) => Signal::BackPressure,
            Some(501) => Signal::Neutral,
            Some(s) if (500..600).contains(&s) => Signal::BackPressure,
            Some(_) => Signal::Neutral,
        }
    }
}

/// A smoothed mean and variance (exponentially weighted).
#[derive(Debug, Clone, Copy, Default)]
struct Ewma {
    mean: f64,
    var: f64,
    primed: bool,
}

impl Ewma {
    fn add(&mut self, x: f64) {
        if !self.primed {
            *self = Ewma {
                mean: x,
                var: 0.0,
                primed: true,
            };
            return;
        }
        let diff = x - self.mean;
        self.mean += EWMA_ALPHA * diff;
        self.var = (1.0 - EWMA_ALPHA) * (self.var + EWMA_ALPHA * diff * diff);
    }
}

/// One webhook's adaptive in-flight limit. Times are microseconds on the caller's clock.
#[derive(Debug, Clone)]
pub struct Controller {
    limit: u32,
    /// Where the limit started; a lifted cap lets it back up to here at once.
    initial: u32,
    /// The engine's ceiling (`delivery.max_in_flight_per_webhook`) or the webhook's own
    /// `max_concurrency`, whichever is lower.
    ceiling: u32,
    in_flight: u32,
    rtt: Ewma,
    /// The current window: sum and count of successful response times (µs).
    sum_us: f64,
    samples: u32,
    reached_limit: bool,
    back_pressure: bool,
    /// When the current window ends (µs).
    window_ends_us: u64,
    /// When the endpoint last refused (back-pressure), µs; 0: never.
    refused_us: u64,
    /// Whether the window before this one had a refusal (refusals that span windows are one
    /// episode).
    refused_last_window: bool,
    /// Below this the limit doubles per window (half the limit when the last episode of
    /// refusals began; 0: none yet).
    recover_to: u32,
}

impl Controller {
    /// A controller starting at `initial` (clamped to `1..=ceiling`).
    pub fn new(initial: u32, ceiling: u32) -> Controller {
        let ceiling = ceiling.max(1);
        Controller {
            limit: initial.clamp(1, ceiling),
            initial: initial.max(1),
            ceiling,
            in_flight: 0,
            rtt: Ewma::default(),
            sum_us: 0.0,
            samples: 0,
            reached_limit: false,
            back_pressure: false,
            window_ends_us: 0,
            refused_us: 0,
            refused_last_window: false,
            recover_to: 0,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn ceiling(&self) -> u32 {
        self.ceiling
    }

    /// Attempts counted in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether another attempt may start now.
    pub fn has_room(&self) -> bool {
        self.in_flight < self.limit
    }

    /// A new ceiling (the configuration or the webhook's `max_concurrency` changed); the
    /// limit follows it down at once, and a limit the old ceiling pinned goes back up to the
    /// initial limit at once when the ceiling rises (from there it adapts as usual).
    pub fn set_ceiling(&mut self, ceiling: u32) {
        let ceiling = ceiling.max(1);
        if ceiling > self.ceiling && self.limit >= self.ceiling {
            self.limit = self.limit.max(self.initial);
        }
        self.ceiling = ceiling;
        self.limit = self.limit.min(self.ceiling);
    }

    /// An attempt starts.
    pub fn started(&mut self) {
        self.in_flight += 1;
        if self.in_flight >= self.limit {
            self.reached_limit = true;
        }
    }

    /// An attempt that [`Controller::started`] ended with `signal` after `rtt`, at `now_us`.
    pub fn finished(&mut self, signal: Signal, rtt: Duration, now_us: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match signal {
            Signal::Success => {
                self.sum_us += rtt.as_micros() as f64;
                self.samples += 1;
            }
            Signal::BackPressure => {
                // Shrink at the first refusal of a window rather than at its end: an endpoint
                // that starts failing should see fewer requests at once, not a window later.
                if !self.back_pressure {
                    if !self.refused_last_window {
                        // Refusals begin: once they end, recover quickly up to half of this.
                        self.recover_to = (self.limit / 2).max(1);
                    }
                    self.back_pressure = true;
                    self.shrink();
                }
                self.refused_us = now_us.max(1);
            }
            Signal::Neutral => {}
        }
        if self.window_ends_us == 0 {
            self.window_ends_us = now_us + self.window_us();
        } else if now_us >= self.window_ends_us {
            self.decide(now_us);
        }
    }

    /// Whether the endpoint's own refusals are what holds the limit down at `now_us`: it
    /// pushed back within the last [`HELD_DOWN_FOR`], or the webhook's own `max_concurrency`
    /// is the cap. Waiting behind such a limit is the endpoint's (or its owner's) doing.
    pub fn held_down(&self, now_us: u64, customer_cap: bool) -> bool {
        (customer_cap && self.limit >= self.ceiling)
            || (self.refused_us != 0
                && now_us.saturating_sub(self.refused_us) < HELD_DOWN_FOR.as_micros() as u64)
    }

    fn window_us(&self) -> u64 {
        let mean = if self.rtt.primed {
            self.rtt.mean as u64
        } else {
            0
        };
        mean.clamp(MIN_WINDOW.as_micros() as u64, MAX_WINDOW.as_micros() as u64)
    }

    fn shrink(&mut self) {
        let shrunk = ((self.limit as f64) * DECREASE).floor() as u32;
        self.limit = shrunk.min(self.limit.saturating_sub(1)).max(1);
    }

    fn decide(&mut self, now_us: u64) {
        let current = (self.samples > 0).then(|| self.sum_us / self.samples as f64);
        let past = self.rtt;
        let rose = match current {
            Some(c) if past.primed => c >= past.mean + RTT_DEVIATIONS * past.var.sqrt(),
            _ => false,
        };
        let not_slower = match current {
            Some(c) => !past.primed || c <= past.mean,
            None => false,
        };
        if self.back_pressure {
            // Already shrunk when the refusal came in.
        } else if rose && past.var > 0.0 {
            self.shrink();
        } else if self.reached_limit && not_slower && self.limit < self.ceiling {
            // Recovering from refusals, the limit doubles back to half of what it was when they
            // began (TCP's slow start up to its threshold); past that it probes in small steps.
            let step = if self.limit < self.recover_to {
                self.limit.min(self.recover_to - self.limit)
            } else {
                (self.limit / GROWTH).max(1)
            };
            self.limit = (self.limit + step).min(self.ceiling);
        }
        if let Some(c) = current {
            self.rtt.add(c);
        }
        self.sum_us = 0.0;
        self.samples = 0;
        self.refused_last_window = self.back_pressure;
        self.back_pressure = false;
        self.reached_limit = self.in_flight >= self.limit;
        self.window_ends_us = now_us + self.window_us();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000;

    /// Runs `n` windows at `in_flight` = the limit, each attempt taking `rtt(limit)` and
    /// answering `signal(limit)`; returns the limits seen at each window's end.
    fn drive(
        c: &mut Controller,
        now: &mut u64,
        windows: usize,
        rtt: impl Fn(u32) -> u64,
        signal: impl Fn(u32) -> Signal,
    ) -> Vec<u32> {
        let mut seen = Vec::new();
        for _ in 0..windows {
            let limit = c.limit();
            while c.has_room() {
                c.started();
            }
            let r = rtt(limit).max(1);
            // Every attempt in flight answers after r; a window is about one rtt.
            *now += r * MS;
            for _ in 0..limit {
                c.finished(signal(limit), Duration::from_micros(r * MS), *now);
            }
            seen.push(c.limit());
        }
        seen
    }

    #[test]
    fn signals_are_read_off_the_status() {
        assert_eq!(Signal::of(Some(200)), Signal::Success);
        assert_eq!(Signal::of(Some(204)), Signal::Success);
        assert_eq!(Signal::of(Some(429)), Signal::BackPressure);
        assert_eq!(Signal::of(Some(408)), Signal::BackPressure);
        assert_eq!(Signal::of(Some(503)), Signal::BackPressure);
        assert_eq!(Signal::of(Some(500)), Signal::BackPressure);
        assert_eq!(Signal::of(None), Signal::BackPressure);
        assert_eq!(Signal::of(Some(501)), Signal::Neutral);
        assert_eq!(Signal::of(Some(404)), Signal::Neutral);
        assert_eq!(Signal::of(Some(410)), Signal::Neutral);
        assert_eq!(Signal::of(Some(302)), Signal::Neutral);
    }

    #[test]
    fn a_healthy_endpoint_grows_the_limit_to_the_ceiling() {
        let mut c = Controller::new(64, 1024);
        let mut now = 1;
        let seen = drive(&mut c, &mut now, 200, |_| 10, |_| Signal::Success);
        assert!(
            seen.windows(2).all(|w| w[1] >= w[0]),
            "never shrinks: {seen:?}"
        );
        assert_eq!(c.limit(), 1024, "{seen:?}");
        // 64 → 1024 in well under 200 windows (one window ≈ one response time).
        let at = seen.iter().position(|&l| l == 1024).unwrap();
        assert!(at < 80, "reached the ceiling after {at} windows");
    }

    #[test]
    fn an_idle_webhook_does_not_drift_upward() {
        let mut c = Controller::new(64, 1024);
        let mut now = 1;
        for _ in 0..500 {
            // One attempt at a time: the limit is never reached.
            c.started();
            now += 10 * MS;
            c.finished(Signal::Success, Duration::from_millis(10), now);
        }
        assert_eq!(c.limit(), 64);
    }

    #[test]
    fn back_pressure_halves_the_limit_within_a_few_windows_and_it_recovers() {
        let mut c = Controller::new(512, 1024);
        let mut now = 1;
        drive(&mut c, &mut now, 3, |_| 10, |_| Signal::Success);
        let before = c.limit();
        let seen = drive(&mut c, &mut now, 7, |_| 10, |_| Signal::BackPressure);
        assert!(
            *seen.last().unwrap() <= before / 2,
            "{before} -> {seen:?} after 7 windows of 503s"
        );
        assert!(c.held_down(now, false));
        // Recovers once the endpoint answers 2xx again, and stops being "held down".
        let seen = drive(&mut c, &mut now, 300, |_| 10, |_| Signal::Success);
        assert!(*seen.last().unwrap() >= before, "{seen:?}");
        assert!(!c.held_down(now, false));
    }

    #[test]
    fn after_refusals_end_the_limit_doubles_back_to_half_of_where_they_began() {
        let mut c = Controller::new(256, 1024);
        let mut now = 1;
        drive(&mut c, &mut now, 80, |_| 10, |_| Signal::BackPressure);
        assert_eq!(c.limit(), 1);
        let seen = drive(&mut c, &mut now, 9, |_| 10, |_| Signal::Success);
        assert_eq!(&seen[..8], &[2, 4, 8, 16, 32, 64, 128, 136], "{seen:?}");
    }

    #[test]
    fn the_floor_is_one() {
        let mut c = Controller::new(4, 1024);
        let mut now = 1;
        let seen = drive(&mut c, &mut now, 50, |_| 10, |_| Signal::BackPressure);
        assert_eq!(*seen.last().unwrap(), 1);
        assert!(seen.iter().all(|&l| l >= 1));
    }

    #[test]
    fn an_endpoint_whose_latency_rises_with_load_is_not_hammered() {
        // Latency 10 ms up to 20 in flight, then steeply more: the limit settles near the knee.
        let mut c = Controller::new(64, 1024);
        let mut now = 1;
        let knee = |l: u32| {
            if l <= 20 {
                10
            } else {
                10 + (l as u64 - 20) * 4
            }
        };
        let seen = drive(&mut c, &mut now, 400, knee, |_| Signal::Success);
        let tail = &seen[300..];
        let max = *tail.iter().max().unwrap();
        assert!(
            max < 200,
            "limit ran away from a degrading endpoint: {tail:?}"
        );
        assert!(*tail.iter().min().unwrap() >= 1);
    }

    #[test]
    fn an_endpoint_that_refuses_above_n_is_held_near_n() {
        let mut c = Controller::new(64, 1024);
        let mut now = 1;
        let seen = drive(
            &mut c,
            &mut now,
            400,
            |_| 10,
            |l| {
                if l > 30 {
                    Signal::BackPressure
                } else {
                    Signal::Success
                }
            },
        );
        let tail = &seen[200..];
        assert!(tail.iter().all(|&l| l <= 34), "{tail:?}");
        assert!(tail.iter().any(|&l| l >= 25), "{tail:?}");
    }

    #[test]
    fn a_lower_ceiling_caps_the_limit_at_once() {
        let mut c = Controller::new(64, 1024);
        c.set_ceiling(8);
        assert_eq!(c.limit(), 8);
        let mut now = 1;
        drive(&mut c, &mut now, 50, |_| 10, |_| Signal::Success);
        assert_eq!(c.limit(), 8);
        // A customer cap that binds holds the limit down (the owner chose it).
        assert!(c.held_down(now, true));
        assert!(!c.held_down(now, false));
        // Lifted: back to the initial limit at once, not one step per window.
        c.set_ceiling(1024);
        assert_eq!(c.limit(), 64);
        c.set_ceiling(0);
        assert_eq!(c.limit(), 1, "the floor is 1 even for a zero ceiling");
    }

    #[test]
    fn neutral_answers_neither_grow_nor_shrink() {
        let mut c = Controller::new(64, 1024);
        let mut now = 1;
        drive(&mut c, &mut now, 50, |_| 10, |_| Signal::Neutral);
        assert_eq!(c.limit(), 64);
    }
}
