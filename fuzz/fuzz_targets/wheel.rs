//! A model test of `wheel::Wheel<u64>` driven by the fuzz input, against a
//! `BTreeSet<(deadline, id)>` oracle. After every operation: what fired (set, deadlines and
//! order), `len`, `now`, `deadline(key)` and the `next_deadline` bound agree with the oracle.
//!
//! The oracle follows the wheel's documented contract (src/wheel.rs): deadlines are clamped
//! into `[now, now + MAX_RANGE_MS]` at insert; `poll` moves out every entry with deadline <=
//! now in non-decreasing deadline order (ties in any order); `poll_at_most` moves out the
//! earliest `max` of them; time never goes backwards; stale keys remove nothing.
#![no_main]

use std::collections::{BTreeSet, HashMap};

use arbitrary::Arbitrary;
use kyberhook::wheel::{TimerKey, Wheel};
use libfuzzer_sys::fuzz_target;

/// The wheel's reach, 63 top-level slots of 2^30 ms (documented in src/wheel.rs).
const MAX_RANGE_MS: u64 = 63 << 30;
const LEVELS: u8 = 6;
const LEVEL_BITS: u32 = 6;
const DAY: u64 = 86_400_000;

/// A distance in ms, shaped to reach every level of the wheel and its edges.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Span {
    Tiny(u8),
    Short(u16),
    Medium(u32),
    Days(u16),
    /// Just around the end of the wheel's range.
    RangeEdge(i8),
    Any(u64),
}

impl Span {
    fn ms(self) -> u64 {
        match self {
            Span::Tiny(n) => u64::from(n % 70),
            Span::Short(n) => u64::from(n),
            Span::Medium(n) => u64::from(n),
            Span::Days(n) => u64::from(n % 1000) * DAY + u64::from(n) * 7919 % DAY,
            Span::RangeEdge(d) => MAX_RANGE_MS.saturating_add_signed(i64::from(d)),
            Span::Any(n) => n,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    /// Deadline at `now + span`.
    Insert(Span),
    /// Deadline `span` before now (fires on the next poll, reported as now).
    InsertPast(Span),
    /// Deadline on, or one ms either side of, a slot boundary of `level`, `slots` ahead.
    InsertAligned {
        level: u8,
        slots: u8,
        delta: i8,
    },
    /// Cancel the `n % issued`-th key ever issued (live or stale).
    Remove(u16),
    /// Look up the `n % issued`-th key's deadline.
    Deadline(u16),
    Poll(Span),
    PollAligned {
        level: u8,
        slots: u8,
        delta: i8,
    },
    PollAtMost(Span, u8),
    /// Poll at whatever `next_deadline()` says, as the scheduler does.
    PollNextDeadline,
    /// Poll at a time before `now()`: treated as now.
    PollBackwards(Span),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Start {
    Zero,
    UnixMs(u32),
    /// Just before a 2^36-ms block boundary, where the top level wraps.
    BeforeBlockEnd(u32),
    NearU64Max(u16),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
struct Input {
    start: Start,
    /// Wheel time to advance (on an empty wheel) before the operations.
    warp: Span,
    ops: Vec<Op>,
}

struct Model {
    now: u64,
    /// (deadline, id) of everything scheduled.
    live: BTreeSet<(u64, u64)>,
    deadline_of: HashMap<u64, u64>,
    /// Every key ever issued, with its id.
    keys: Vec<(TimerKey, u64)>,
}

impl Model {
    fn check_poll(&mut self, target: u64, max: usize, fired: &[(u64, u64)]) {
        self.now = self.now.max(target);
        let due: Vec<u64> = self
            .live
            .iter()
            .take_while(|&&(d, _)| d <= self.now)
            .take(max)
            .map(|&(d, _)| d)
            .collect();
        let got: Vec<u64> = fired.iter().map(|&(d, _)| d).collect();
        // Ties may come out in any order: compare the deadlines in order, then check that each
        // fired id was scheduled at exactly the deadline it came out with.
        assert_eq!(got, due, "fired deadlines vs oracle at now {}", self.now);
        for &(d, id) in fired {
            assert!(
                self.live.remove(&(d, id)),
                "fired {id}@{d}, not scheduled so"
            );
            self.deadline_of.remove(&id);
        }
        if fired.len() < max {
            if let Some(&(d, id)) = self.live.first() {
                assert!(d > self.now, "{id}@{d} due at {} but left behind", self.now);
            }
        }
    }

    fn key(&self, n: u16) -> Option<(TimerKey, u64)> {
        (!self.keys.is_empty()).then(|| self.keys[usize::from(n) % self.keys.len()])
    }
}

/// Absolute time `slots` slot widths of `level` past the slot boundary at or before now,
/// nudged by `delta` ms, measured in wheel time (relative to `start`).
fn aligned(start: u64, now: u64, level: u8, slots: u8, delta: i8) -> u64 {
    let shift = u32::from(level % LEVELS) * LEVEL_BITS;
    let rel = now - start;
    let slot_start = ((rel >> shift).saturating_add(u64::from(slots % 66))) << shift;
    start
        .saturating_add(slot_start)
        .saturating_add_signed(i64::from(delta % 2))
}

fuzz_target!(|input: Input| {
    let start = match input.start {
        Start::Zero => 0,
        Start::UnixMs(n) => 1_700_000_000_000 + u64::from(n),
        Start::BeforeBlockEnd(n) => (1 << 36) - 20 * DAY + u64::from(n),
        Start::NearU64Max(n) => u64::MAX - u64::from(n),
        Start::Any(n) => n,
    };
    let mut w: Wheel<u64> = Wheel::new(start);
    assert_eq!(w.now(), start);
    let begin = start.saturating_add(input.warp.ms());
    let mut out = Vec::new();
    assert_eq!(w.poll(begin, &mut out), 0);
    assert!(out.is_empty() && w.is_empty() && w.next_deadline().is_none());
    let mut m = Model {
        now: begin,
        live: BTreeSet::new(),
        deadline_of: HashMap::new(),
        keys: Vec::new(),
    };
    let mut next_id = 0u64;
    for op in input.ops.iter().take(2000) {
        out.clear();
        match *op {
            Op::Insert(_) | Op::InsertPast(_) | Op::InsertAligned { .. } => {
                let when = match *op {
                    Op::Insert(s) => m.now.saturating_add(s.ms()),
                    Op::InsertPast(s) => m.now.saturating_sub(s.ms()),
                    Op::InsertAligned {
                        level,
                        slots,
                        delta,
                    } => aligned(start, m.now, level, slots, delta),
                    _ => unreachable!(),
                };
                let id = next_id;
                next_id += 1;
                let key = w.insert(when, id);
                let effective = when.clamp(m.now, m.now.saturating_add(MAX_RANGE_MS));
                assert_eq!(w.deadline(key), Some(effective), "insert at {when}");
                m.live.insert((effective, id));
                m.deadline_of.insert(id, effective);
                m.keys.push((key, id));
            }
            Op::Remove(n) => {
                let Some((key, id)) = m.key(n) else { continue };
                match m.deadline_of.remove(&id) {
                    Some(d) => {
                        assert_eq!(w.remove(key), Some(id), "removing live {id}@{d}");
                        assert!(m.live.remove(&(d, id)));
                    }
                    None => assert_eq!(w.remove(key), None, "stale key of {id} removed something"),
                }
            }
            Op::Deadline(n) => {
                let Some((key, id)) = m.key(n) else { continue };
                assert_eq!(w.deadline(key), m.deadline_of.get(&id).copied());
            }
            Op::Poll(s) => {
                let target = m.now.saturating_add(s.ms());
                let n = w.poll(target, &mut out);
                assert_eq!(n, out.len());
                m.check_poll(target, usize::MAX, &out);
            }
            Op::PollAligned {
                level,
                slots,
                delta,
            } => {
                let target = aligned(start, m.now, level, slots, delta);
                let n = w.poll(target, &mut out);
                assert_eq!(n, out.len());
                m.check_poll(target, usize::MAX, &out);
            }
            Op::PollAtMost(s, max) => {
                let target = m.now.saturating_add(s.ms());
                let max = usize::from(max % 8);
                let n = w.poll_at_most(target, max, &mut out);
                assert_eq!(n, out.len());
                assert!(n <= max);
                m.check_poll(target, max, &out);
            }
            Op::PollNextDeadline => {
                if let Some(target) = w.next_deadline() {
                    let n = w.poll(target, &mut out);
                    assert_eq!(n, out.len());
                    m.check_poll(target, usize::MAX, &out);
                }
            }
            Op::PollBackwards(s) => {
                let target = m.now.saturating_sub(s.ms());
                let n = w.poll(target, &mut out);
                assert_eq!(n, out.len());
                m.check_poll(target, usize::MAX, &out);
            }
        }
        assert_eq!(w.now(), m.now);
        assert_eq!(w.len(), m.live.len());
        assert_eq!(w.is_empty(), m.live.is_empty());
        // next_deadline is a lower bound on the earliest deadline, exact when something is
        // due, and after now when nothing is.
        match (w.next_deadline(), m.live.first()) {
            (None, None) => {}
            (Some(hint), Some(&(min, _))) => {
                assert!(hint <= min, "next_deadline {hint} after the earliest {min}");
                if min <= m.now {
                    assert_eq!(hint, min, "something is due: next_deadline must be exact");
                } else {
                    assert!(hint > m.now, "next_deadline {hint} not after now {}", m.now);
                }
            }
            (hint, min) => panic!("next_deadline {hint:?} vs oracle {min:?}"),
        }
    }
    for &(key, id) in &m.keys {
        assert_eq!(w.deadline(key), m.deadline_of.get(&id).copied());
    }
    // Draining by next_deadline, as the scheduler does, empties the wheel in order.
    // Each timer costs at most five extra wake-ups (one per level it cascades through).
    let budget = 6 * m.live.len() + 1;
    let mut last = 0;
    let mut steps = 0;
    while let Some(target) = w.next_deadline() {
        steps += 1;
        assert!(
            steps <= budget,
            "next_deadline does not converge on the deadlines"
        );
        out.clear();
        w.poll(target, &mut out);
        for &(d, id) in &out {
            assert!(d >= last, "drained out of order");
            last = d;
            assert!(
                m.live.remove(&(d, id)),
                "drained {id}@{d}, not scheduled so"
            );
        }
    }
    assert!(m.live.is_empty() && w.is_empty());
});
