//! How a receiver answers: a delay, then a status (or no answer at all). Modes are parsed from
//! the command line (`--receiver-latency`, `--fail-mode`) and from the receiver's control
//! requests, and printed back the same way, so a mode travels between the bench and its
//! receiver processes as text.
//!
//! Syntax: parts joined by `+`, e.g. `fixed:50+status:503`.
//! - `instant` (or `0`): no delay, 200 (the default);
//! - `fixed:MS`: answer after MS milliseconds (a timer: the thread keeps serving others);
//! - `load` or `load:BASE:PER`: answer after BASE + PER × (requests in flight at arrival) ms,
//!   default `load:1:0.1` (256 in flight: 26.6 ms), a server whose answer time rises with load;
//! - `status:CODE`: answer CODE instead of 200;
//! - `hang`: never answer (the request is held until the client gives up, at most 10 min).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Delay {
    #[default]
    None,
    Fixed(Duration),
    Load {
        base_ms: f64,
        per_in_flight_ms: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Status(u16),
    Hang,
}

impl Default for Answer {
    fn default() -> Self {
        Answer::Status(200)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Mode {
    pub delay: Delay,
    pub answer: Answer,
}

/// The longest a `hang` holds a request.
pub const HANG_MAX: Duration = Duration::from_secs(600);

impl Mode {
    /// The delay before answering a request that arrived with `in_flight` others in flight.
    pub fn delay(&self, in_flight: u64) -> Duration {
        match self.delay {
            Delay::None => Duration::ZERO,
            Delay::Fixed(d) => d,
            Delay::Load {
                base_ms,
                per_in_flight_ms,
            } => Duration::from_secs_f64(
                ((base_ms + per_in_flight_ms * in_flight as f64) / 1e3).min(60.0),
            ),
        }
    }

    /// The same delay, answering `answer` instead.
    pub fn with_answer(self, answer: Answer) -> Mode {
        Mode { answer, ..self }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error("{0:?} is not a receiver mode (instant, fixed:MS, load[:BASE:PER], status:CODE, hang; join with +)")]
    Unknown(String),
    #[error("{0:?}: {1}")]
    BadNumber(String, &'static str),
}

impl FromStr for Mode {
    type Err = ModeError;

    fn from_str(s: &str) -> Result<Mode, ModeError> {
        let mut mode = Mode::default();
        for part in s.trim().split('+').map(str::trim) {
            let (name, arg) = part.split_once(':').unwrap_or((part, ""));
            let bad = |why| ModeError::BadNumber(part.to_string(), why);
            match (name, arg) {
                ("instant" | "0", "") => {}
                ("fixed", ms) => {
                    let ms: u64 = ms
                        .parse()
                        .map_err(|_| bad("milliseconds, e.g. fixed:300"))?;
                    mode.delay = Delay::Fixed(Duration::from_millis(ms.min(600_000)));
                }
                ("load", "") => {
                    mode.delay = Delay::Load {
                        base_ms: 1.0,
                        per_in_flight_ms: 0.1,
                    }
                }
                ("load", args) => {
                    let (b, p) = args.split_once(':').ok_or_else(|| bad("load:BASE:PER"))?;
                    let (base_ms, per_in_flight_ms): (f64, f64) = (
                        b.parse().map_err(|_| bad("load:BASE:PER in ms"))?,
                        p.parse().map_err(|_| bad("load:BASE:PER in ms"))?,
                    );
                    if !(0.0..=60_000.0).contains(&base_ms)
                        || !(0.0..=1_000.0).contains(&per_in_flight_ms)
                    {
                        return Err(bad("BASE 0..60000, PER 0..1000"));
                    }
                    mode.delay = Delay::Load {
                        base_ms,
                        per_in_flight_ms,
                    };
                }
                ("status", code) => {
                    let code: u16 = code.parse().map_err(|_| bad("status:CODE"))?;
                    if !(200..=599).contains(&code) {
                        return Err(bad("a status 200..599"));
                    }
                    mode.answer = Answer::Status(code);
                }
                ("hang", "") => mode.answer = Answer::Hang,
                _ => return Err(ModeError::Unknown(part.to_string())),
            }
        }
        Ok(mode)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        match self.delay {
            Delay::None => {}
            Delay::Fixed(d) => parts.push(format!("fixed:{}", d.as_millis())),
            Delay::Load {
                base_ms,
                per_in_flight_ms,
            } => parts.push(format!("load:{base_ms}:{per_in_flight_ms}")),
        }
        match self.answer {
            Answer::Status(200) => {}
            Answer::Status(c) => parts.push(format!("status:{c}")),
            Answer::Hang => parts.push("hang".into()),
        }
        if parts.is_empty() {
            parts.push("instant".into());
        }
        f.write_str(&parts.join("+"))
    }
}
