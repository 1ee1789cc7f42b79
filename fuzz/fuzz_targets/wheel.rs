//! A model test of `wheel::Wheel<u64>` driven by the fuzz input, against the wheel's oracle
//! (`kyberhook::wheel::oracle`, a `BTreeSet<(deadline, id)>` model of the documented contract,
//! shared with the property test in src/wheel.rs). After every operation: what fired (set,
//! deadlines and order), `len`, `now`, `deadline(key)`, the `next_deadline` bound and the
//! wheel's structural invariants agree with the oracle; at the end, draining by
//! `next_deadline` empties the wheel in order.
#![no_main]

use arbitrary::Arbitrary;
use kyberhook::wheel::oracle::Oracle;
use libfuzzer_sys::fuzz_target;

/// The wheel's reach, 63 top-level slots of 2^30 ms (documented in src/wheel.rs).
const MAX_RANGE_MS: u64 = 63 << 30;
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

fuzz_target!(|input: Input| {
    let start = match input.start {
        Start::Zero => 0,
        Start::UnixMs(n) => 1_700_000_000_000 + u64::from(n),
        Start::BeforeBlockEnd(n) => (1 << 36) - 20 * DAY + u64::from(n),
        Start::NearU64Max(n) => u64::MAX - u64::from(n),
        Start::Any(n) => n,
    };
    let mut o = Oracle::new(start, input.warp.ms());
    for op in input.ops.iter().take(2000) {
        // Levels and slots are taken modulo the wheel's shape (6 levels, a little past its 64
        // slots), deltas to one ms either side of the boundary.
        let aligned = |o: &Oracle, level: u8, slots: u8, delta: i8| {
            o.aligned(usize::from(level), u64::from(slots % 66), delta % 2)
        };
        match *op {
            Op::Insert(s) => o.insert(o.now().saturating_add(s.ms())),
            Op::InsertPast(s) => o.insert(o.now().saturating_sub(s.ms())),
            Op::InsertAligned {
                level,
                slots,
                delta,
            } => o.insert(aligned(&o, level, slots, delta)),
            Op::Remove(n) => o.remove(usize::from(n)),
            Op::Deadline(n) => o.deadline(usize::from(n)),
            Op::Poll(s) => o.poll(o.now().saturating_add(s.ms())),
            Op::PollAligned {
                level,
                slots,
                delta,
            } => o.poll(aligned(&o, level, slots, delta)),
            Op::PollAtMost(s, max) => {
                o.poll_at_most(o.now().saturating_add(s.ms()), usize::from(max % 8))
            }
            Op::PollNextDeadline => o.poll_next_deadline(),
            Op::PollBackwards(s) => o.poll(o.now().saturating_sub(s.ms())),
        }
    }
    o.finish();
});
