//! The engine's clock: unix milliseconds that advance with tokio's clock.
//!
//! Every deadline the engine computes (retry due times, rate-limit deferrals, the timing wheel)
//! reads this clock, so that tests can run the pipeline under `tokio::time::pause()` and move
//! time forward instantly. Outside tests it is the wall clock, sampled once at start-up and
//! advanced by the monotonic clock (so a wall-clock step does not reorder deadlines).

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

static BASE: OnceLock<(u64, std::time::Instant)> = OnceLock::new();

fn base() -> (u64, std::time::Instant) {
    *BASE.get_or_init(|| {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        (unix, std::time::Instant::now())
    })
}

/// Unix milliseconds, per tokio's clock when called inside a runtime (paused in tests).
pub fn now_ms() -> u64 {
    let (unix, start) = base();
    let now = tokio::time::Instant::now().into_std();
    unix + now.saturating_duration_since(start).as_millis() as u64
}

/// The tokio instant at which [`now_ms`] reads `ms`.
pub fn instant_at(ms: u64) -> tokio::time::Instant {
    let (unix, start) = base();
    let offset = std::time::Duration::from_millis(ms.saturating_sub(unix));
    tokio::time::Instant::from_std(start + offset)
}

/// [`now_ms`] with microsecond resolution, as a duration since the unix epoch.
pub fn now() -> std::time::Duration {
    let (unix, start) = base();
    let now = tokio::time::Instant::now().into_std();
    std::time::Duration::from_millis(unix) + now.saturating_duration_since(start)
}

/// [`now`] in microseconds (the adaptive limits' clock).
pub fn now_us() -> u64 {
    now().as_micros() as u64
}
