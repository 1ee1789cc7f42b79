//! Hierarchical timing wheel: the scheduler behind retries and other
//! millisecond deadlines.
//!
//! This module owns every scheduled timer of the engine: each entry's value,
//! its deadline and its place in the wheel. Data enters through
//! [`Wheel::insert`], which hands back a [`TimerKey`] for cancellation with
//! [`Wheel::remove`]; it leaves through [`Wheel::poll`] /
//! [`Wheel::poll_at_most`], which advance the clock and move every due value
//! out to the caller as `(deadline, value)` in non-decreasing deadline order.
//! The wheel never reads a clock itself: the owner passes the current time in
//! (absolute milliseconds, e.g. unix ms) and uses [`Wheel::next_deadline`] to
//! decide how long to sleep.
//!
//! # Design
//!
//! This is the hierarchical timing wheel of Varghese & Lauck, "Hashed and
//! Hierarchical Timing Wheels: Data Structures for the Efficient
//! Implementation of a Timer Facility", SOSP 1987, laid out as in
//! tokio-util's `time::wheel`: one tick is one millisecond, and there are six
//! levels of 64 slots. A deadline sits on the level of the highest 6-bit digit
//! in which it differs from the current time, in the slot named by its own
//! digit on that level, so insert and cancel are O(1) and a level's next
//! occupied slot is one `rotate_right` + `trailing_zeros` on its 64-bit
//! occupancy bitmap.
//!
//! | level | slot width           | level range (64 slots)      |
//! |-------|----------------------|-----------------------------|
//! | 0     | 1 ms                 | 64 ms                       |
//! | 1     | 64 ms                | 4.096 s                     |
//! | 2     | 4.096 s              | 262.144 s (~4.4 min)        |
//! | 3     | 262.144 s (~4.4 min) | 16 777.216 s (~4.7 h)       |
//! | 4     | ~4.7 h               | 1 073 741.824 s (~12.4 d)   |
//! | 5     | ~12.4 d (2^30 ms)    | 2^36 ms (~795.4 d)          |
//!
//! When a slot's start time is reached the slot is taken whole: entries of a
//! higher level cascade to a finer level (or straight to the due list when
//! their deadline is exactly now), entries of level 0 all share one deadline
//! and become due together. Each entry cascades at most five times in its
//! life, so the amortised cost of expiry is O(1) per entry plus O(1) per
//! occupied slot passed.
//!
//! A poll hands each slot's due entries out right after processing the
//! slot, while they are still in cache. Due entries beyond a
//! [`Wheel::poll_at_most`] budget, and inserts with a past deadline, wait on
//! an internal "ready" list in deadline order; this is what lets a chunked
//! poll stop early without holding the clock back.
//!
//! # Clamping
//!
//! Deadlines are clamped into `[now, now + MAX_RANGE_MS]`, where `now` is
//! [`Wheel::now`] at insert time and `MAX_RANGE_MS` = 63 × 2^30 ms =
//! 67 645 734 912 ms (~782.9 days):
//!
//! * a deadline at or before `now` becomes `now`, so it fires on the next
//!   poll and is reported with deadline `now`;
//! * a deadline further out than the range becomes `now + MAX_RANGE_MS` and
//!   fires then (early), reported with that clamped deadline.
//!
//! [`Wheel::deadline`] and the poll output always report the clamped value.
//! The range stops one top-level slot short of a full rotation (63 of 64
//! slots) because the top level is used as a ring: keeping every top-level
//! deadline within 63 slots of the current one means a slot index maps to
//! exactly one future slot, with no wrap ambiguity.
//!
//! # Memory
//!
//! Entries live in a slab (a `Vec` plus an intrusive free list) and are
//! chained into their slot with `u32` prev/next indices, so an entry costs
//! `size_of::<T>()` + 20 bytes rounded up to 8: `size_of` measured 40 bytes
//! for `T = [u8; 16]` on x86_64 (see the `entry_size` test), i.e. 40 MB for
//! a million timers, or up to twice that transiently if the slab `Vec` has
//! just doubled (use [`Wheel::with_capacity`] to avoid it). The fixed part
//! (the level heads and bitmaps) is about 1.6 KiB per wheel. The slab never
//! shrinks: freed slots are reused by later inserts.
//!
//! At most `u32::MAX - 1` entries can be scheduled at once.

use std::fmt;
use std::num::NonZeroU32;

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod oracle;

/// Bits of a deadline consumed per level.
const LEVEL_BITS: u32 = 6;
/// Slots per level.
const SLOTS: usize = 1 << LEVEL_BITS;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
const NUM_LEVELS: usize = 6;
const TOP_LEVEL: usize = NUM_LEVELS - 1;

/// The furthest a deadline may lie ahead of the current time; later ones are
/// clamped to it. One top-level slot short of a full rotation so that a
/// top-level slot index is never ambiguous (see the module docs).
const MAX_RANGE_MS: u64 = ((SLOTS as u64) - 1) << (LEVEL_BITS * TOP_LEVEL as u32);

/// End-of-list marker for the intrusive lists and the free list; it also
/// caps the slab at `u32::MAX - 1` entries.
const NIL: u32 = u32::MAX;

/// Handle returned by insert, used to cancel. Stale keys (already fired or
/// removed) are detected: [`Wheel::remove`] on a stale key returns `None` and
/// never removes some other entry, because each slab slot carries a
/// generation that is bumped every time the slot is freed.
///
/// A stale key could only be mistaken for a live one after its slot had been
/// reused 2^32 - 1 times while the key was kept around.
///
/// A key means something only to the wheel that issued it.
///
/// 8 bytes, and `Option<TimerKey>` is 8 bytes too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    generation: NonZeroU32,
}

/// A scheduled timer. Kept lean because the engine holds up to a million of
/// them: 40 bytes per slab slot for `T = [u8; 16]` on 64-bit targets.
struct Entry<T> {
    value: T,
    /// Deadline in ms relative to `Wheel::start`, already clamped. Together
    /// with `Wheel::elapsed` it determines which list the entry is on, so the
    /// list does not need to be stored.
    when: u64,
    prev: u32,
    next: u32,
    /// Non-zero so that `Slot` can use 0 as its tag instead of growing by
    /// a word.
    generation: NonZeroU32,
}

enum Slot<T> {
    Occupied(Entry<T>),
    Vacant {
        generation: NonZeroU32,
        next_free: u32,
    },
}

#[derive(Clone, Copy)]
struct Level {
    /// Bit `i` is set iff `heads[i]` is a non-empty list.
    occupied: u64,
    heads: [u32; SLOTS],
}

impl Level {
    const EMPTY: Level = Level {
        occupied: 0,
        heads: [NIL; SLOTS],
    };
}

/// The list an entry belongs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum List {
    Ready,
    Slot { level: usize, slot: usize },
}

/// The next slot that must be processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Expiration {
    level: usize,
    slot: usize,
    /// Start of the slot in wheel-relative ms: no entry in it is due earlier.
    deadline: u64,
}

/// A hierarchical timing wheel holding values of type `T`; see the module
/// docs.
///
/// Invariant: every entry with `when <= elapsed` is on the ready list (in
/// non-decreasing `when` order), and every other entry is on slot
/// `slot_for(when, level)` of level `level_for(elapsed, when)`. `remove`
/// relies on it to find an entry's list from its deadline alone.
pub struct Wheel<T> {
    /// Absolute ms that wheel time 0 corresponds to.
    start: u64,
    /// Current time in ms relative to `start`.
    elapsed: u64,
    levels: [Level; NUM_LEVELS],
    /// Entries already due but not yet polled out, oldest deadline first.
    ready_head: u32,
    ready_tail: u32,
    slab: Vec<Slot<T>>,
    free_head: u32,
    len: usize,
}

/// The level a deadline belongs on: the highest 6-bit digit in which it
/// differs from the current time, capped at the top level (which is used as
/// a ring for deadlines in the next 2^36-ms block).
#[inline]
fn level_for(elapsed: u64, when: u64) -> usize {
    // Or-ing in the level-0 digit keeps ilog2 defined and maps "same 64-ms
    // block" to level 0.
    let masked = (elapsed ^ when) | SLOT_MASK;
    let level = (masked.ilog2() / LEVEL_BITS) as usize;
    level.min(TOP_LEVEL)
}

/// The slot of `when` on `level`: simply its digit there.
#[inline]
fn slot_for(when: u64, level: usize) -> usize {
    ((when >> (level as u32 * LEVEL_BITS)) & SLOT_MASK) as usize
}

/// Milliseconds covered by one slot of `level`.
#[cfg(test)]
fn slot_width(level: usize) -> u64 {
    1 << (level as u32 * LEVEL_BITS)
}

impl<T> Wheel<T> {
    /// A wheel whose clock starts at `now_ms` (absolute milliseconds, e.g.
    /// unix ms; the wheel works relative to it).
    pub fn new(now_ms: u64) -> Self {
        Self::with_capacity(now_ms, 0)
    }

    /// Like [`Wheel::new`], with room for `capacity` entries before the slab
    /// reallocates.
    pub fn with_capacity(now_ms: u64, capacity: usize) -> Self {
        Wheel {
            start: now_ms,
            elapsed: 0,
            levels: [Level::EMPTY; NUM_LEVELS],
            ready_head: NIL,
            ready_tail: NIL,
            slab: Vec::with_capacity(capacity),
            free_head: NIL,
            len: 0,
        }
    }

    /// Current wheel time in absolute ms (the last `poll` time, or the
    /// start).
    pub fn now(&self) -> u64 {
        self.start + self.elapsed
    }

    /// Number of scheduled entries, including due ones not yet polled out.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedule `value` at absolute ms `when`. O(1).
    ///
    /// `when` is clamped into `[now(), now() + ~782.9 days]` (see the module
    /// docs): a deadline in the past fires on the next poll.
    ///
    /// # Panics
    ///
    /// If `u32::MAX - 1` entries are already scheduled.
    pub fn insert(&mut self, when: u64, value: T) -> TimerKey {
        // The upper bound also keeps `start + when` from overflowing.
        let max = self
            .elapsed
            .saturating_add(MAX_RANGE_MS)
            .min(u64::MAX - self.start);
        let when = when.saturating_sub(self.start).clamp(self.elapsed, max);
        let key = self.alloc(when, value);
        self.link(key.index);
        self.len += 1;
        key
    }

    /// Cancel; returns the value if it was still scheduled. O(1).
    pub fn remove(&mut self, key: TimerKey) -> Option<T> {
        self.live_entry(key)?;
        self.unlink(key.index);
        self.len -= 1;
        Some(self.release(key.index).value)
    }

    /// The deadline of the entry `key` if still scheduled (after clamping).
    pub fn deadline(&self, key: TimerKey) -> Option<u64> {
        self.live_entry(key).map(|e| self.start + e.when)
    }

    /// The earliest absolute ms at which `poll` could return something.
    /// `None` when empty.
    ///
    /// When something is already due this is the exact earliest deadline
    /// (<= `now()`). Otherwise it is exact if the earliest entry is on level
    /// 0, and else the start of the next occupied slot of a higher level:
    /// never later than the earliest deadline and always later than `now()`.
    /// Polling at such a time may return nothing, but it cascades that slot
    /// so that the next answer is finer; an owner that sleeps until this
    /// value and polls reaches the true deadline, and each timer causes at
    /// most five such extra wake-ups (one per level it cascades through).
    pub fn next_deadline(&self) -> Option<u64> {
        if self.ready_head != NIL {
            return Some(self.start + self.entry(self.ready_head).when);
        }
        self.next_expiration().map(|e| self.start + e.deadline)
    }

    /// Advance the clock to `now_ms` (never backwards: an earlier value is
    /// treated as the current time) and append every entry with deadline <=
    /// `now_ms` to `out` as (deadline, value), in non-decreasing deadline
    /// order. Returns how many were appended. Entries with deadline >
    /// `now_ms` stay scheduled.
    pub fn poll(&mut self, now_ms: u64, out: &mut Vec<(u64, T)>) -> usize {
        self.poll_at_most(now_ms, usize::MAX, out)
    }

    /// Like [`Wheel::poll`] but stops after `max` entries (the rest stay due
    /// and come out on the next call): lets the owner hand work downstream in
    /// bounded chunks.
    ///
    /// The clock still advances to `now_ms` in full, so a chunked drain sees
    /// the same order as one big poll; only the moving-out is bounded. The
    /// internal work of a large jump is not: it cascades every slot passed,
    /// i.e. it is proportional to the entries re-filed (each entry at most
    /// five times in its life) plus the occupied slots passed. Poll in
    /// smaller time steps if a single call must stay short.
    pub fn poll_at_most(&mut self, now_ms: u64, max: usize, out: &mut Vec<(u64, T)>) -> usize {
        let now = now_ms.saturating_sub(self.start);
        // The backlog is older than anything the advance can make due.
        let mut n = self.drain_ready(max, out);
        if now <= self.elapsed {
            return n;
        }
        while let Some(exp) = self.next_expiration() {
            if exp.deadline > now {
                break;
            }
            self.elapsed = exp.deadline;
            self.process_slot(exp.level, exp.slot);
            // Hand each slot's due entries out while they are still in
            // cache, rather than after the whole jump; past `max` they stay
            // on the ready list, still in order.
            n += self.drain_ready(max - n, out);
        }
        self.elapsed = now;
        n
    }

    /// Move up to `max` entries from the front of the ready list to `out`.
    fn drain_ready(&mut self, max: usize, out: &mut Vec<(u64, T)>) -> usize {
        let mut n = 0;
        while n < max && self.ready_head != NIL {
            let idx = self.ready_head;
            let next = self.entry(idx).next;
            self.ready_head = next;
            if next == NIL {
                self.ready_tail = NIL;
            } else {
                self.entry_mut(next).prev = NIL;
            }
            let entry = self.release(idx);
            self.len -= 1;
            out.push((self.start + entry.when, entry.value));
            n += 1;
        }
        n
    }

    /// Take a slot whole and re-file its entries against the current time:
    /// level-0 entries (and higher-level ones due exactly now) go to the
    /// ready list, the rest to a finer level.
    fn process_slot(&mut self, level: usize, slot: usize) {
        let lvl = &mut self.levels[level];
        let mut idx = std::mem::replace(&mut lvl.heads[slot], NIL);
        lvl.occupied &= !(1 << slot);
        while idx != NIL {
            let next = self.entry(idx).next;
            debug_assert!(level > 0 || self.entry(idx).when == self.elapsed);
            self.link(idx);
            idx = next;
        }
    }

    /// The earliest slot to process. The lowest occupied level always wins:
    /// its entries share every higher digit with the current time, so they
    /// come before the next slot boundary of any coarser level.
    fn next_expiration(&self) -> Option<Expiration> {
        let (level, lvl) = self
            .levels
            .iter()
            .enumerate()
            .find(|(_, lvl)| lvl.occupied != 0)?;
        let shift = level as u32 * LEVEL_BITS;
        let now_slot_abs = self.elapsed >> shift;
        let now_slot = (now_slot_abs & SLOT_MASK) as u32;
        // Distance, in slots of this level, from the current slot to the
        // next occupied one. It is never 0: the current slot's entries
        // belong on a finer level. On the top level it may wrap around.
        let dist = u64::from(lvl.occupied.rotate_right(now_slot).trailing_zeros());
        debug_assert!(dist > 0 && dist < SLOTS as u64);
        Some(Expiration {
            level,
            slot: ((u64::from(now_slot) + dist) & SLOT_MASK) as usize,
            deadline: (now_slot_abs + dist) << shift,
        })
    }

    fn list_for(&self, when: u64) -> List {
        if when <= self.elapsed {
            List::Ready
        } else {
            let level = level_for(self.elapsed, when);
            List::Slot {
                level,
                slot: slot_for(when, level),
            }
        }
    }

    /// Put a detached entry on the list its deadline calls for.
    fn link(&mut self, idx: u32) {
        match self.list_for(self.entry(idx).when) {
            List::Ready => {
                // Appending keeps the ready list sorted: anything filed now
                // has `when == elapsed`, and `elapsed` only grows.
                let tail = self.ready_tail;
                let e = self.entry_mut(idx);
                e.prev = tail;
                e.next = NIL;
                if tail == NIL {
                    self.ready_head = idx;
                } else {
                    self.entry_mut(tail).next = idx;
                }
                self.ready_tail = idx;
            }
            List::Slot { level, slot } => {
                // Order within a slot does not matter: level-0 slots hold a
                // single deadline and higher slots are re-filed when taken.
                let head = self.levels[level].heads[slot];
                let e = self.entry_mut(idx);
                e.prev = NIL;
                e.next = head;
                if head != NIL {
                    self.entry_mut(head).prev = idx;
                }
                let lvl = &mut self.levels[level];
                lvl.heads[slot] = idx;
                lvl.occupied |= 1 << slot;
            }
        }
    }

    /// Take an entry off its list; its `prev`/`next` are left stale.
    fn unlink(&mut self, idx: u32) {
        let e = self.entry(idx);
        let (prev, next) = (e.prev, e.next);
        match self.list_for(e.when) {
            List::Ready => {
                if prev == NIL {
                    debug_assert_eq!(self.ready_head, idx);
                    self.ready_head = next;
                } else {
                    self.entry_mut(prev).next = next;
                }
                if next == NIL {
                    debug_assert_eq!(self.ready_tail, idx);
                    self.ready_tail = prev;
                } else {
                    self.entry_mut(next).prev = prev;
                }
            }
            List::Slot { level, slot } => {
                if prev == NIL {
                    let lvl = &mut self.levels[level];
                    debug_assert_eq!(lvl.heads[slot], idx);
                    lvl.heads[slot] = next;
                    if next == NIL {
                        lvl.occupied &= !(1 << slot);
                    }
                } else {
                    self.entry_mut(prev).next = next;
                }
                if next != NIL {
                    self.entry_mut(next).prev = prev;
                }
            }
        }
    }

    fn live_entry(&self, key: TimerKey) -> Option<&Entry<T>> {
        match self.slab.get(key.index as usize) {
            Some(Slot::Occupied(e)) if e.generation == key.generation => Some(e),
            _ => None,
        }
    }

    fn entry(&self, idx: u32) -> &Entry<T> {
        match &self.slab[idx as usize] {
            Slot::Occupied(e) => e,
            Slot::Vacant { .. } => unreachable!("timer list points at a free slab slot"),
        }
    }

    fn entry_mut(&mut self, idx: u32) -> &mut Entry<T> {
        match &mut self.slab[idx as usize] {
            Slot::Occupied(e) => e,
            Slot::Vacant { .. } => unreachable!("timer list points at a free slab slot"),
        }
    }

    /// Store a new, unlinked entry in the slab.
    fn alloc(&mut self, when: u64, value: T) -> TimerKey {
        let mut entry = Entry {
            value,
            when,
            prev: NIL,
            next: NIL,
            generation: NonZeroU32::MIN,
        };
        if self.free_head != NIL {
            let index = self.free_head;
            let slot = &mut self.slab[index as usize];
            let Slot::Vacant {
                generation,
                next_free,
            } = *slot
            else {
                unreachable!("free list points at an occupied slab slot")
            };
            entry.generation = generation;
            *slot = Slot::Occupied(entry);
            self.free_head = next_free;
            TimerKey { index, generation }
        } else {
            let index = self.slab.len();
            assert!(index < NIL as usize, "timing wheel is full");
            self.slab.push(Slot::Occupied(entry));
            TimerKey {
                index: index as u32,
                generation: NonZeroU32::MIN,
            }
        }
    }

    /// Free an (already unlinked) entry's slot and hand the entry back.
    fn release(&mut self, idx: u32) -> Entry<T> {
        let vacant = Slot::Vacant {
            // Bumped so that keys to the old occupant go stale.
            generation: (self.entry(idx).generation)
                .checked_add(1)
                .unwrap_or(NonZeroU32::MIN),
            next_free: self.free_head,
        };
        self.free_head = idx;
        match std::mem::replace(&mut self.slab[idx as usize], vacant) {
            Slot::Occupied(e) => e,
            Slot::Vacant { .. } => unreachable!("released a free slab slot"),
        }
    }
}

impl<T> fmt::Debug for Wheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wheel")
            .field("now", &self.now())
            .field("len", &self.len)
            .field("next_deadline", &self.next_deadline())
            .finish_non_exhaustive()
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl<T> Wheel<T> {
    /// Walk every list and check the structural invariants against the slab.
    fn assert_invariants(&self) {
        let mut seen = 0;

        let mut prev = NIL;
        let mut idx = self.ready_head;
        let mut last = 0;
        while idx != NIL {
            let e = self.entry(idx);
            assert_eq!(e.prev, prev, "ready list back link");
            assert!(e.when <= self.elapsed, "not due but on the ready list");
            assert!(e.when >= last, "ready list out of order");
            assert_eq!(self.list_for(e.when), List::Ready);
            last = e.when;
            prev = idx;
            idx = e.next;
            seen += 1;
        }
        assert_eq!(self.ready_tail, prev, "ready tail");

        for (level, lvl) in self.levels.iter().enumerate() {
            for slot in 0..SLOTS {
                let head = lvl.heads[slot];
                assert_eq!(
                    lvl.occupied & (1 << slot) != 0,
                    head != NIL,
                    "occupancy bit of level {level} slot {slot}"
                );
                let mut prev = NIL;
                let mut idx = head;
                while idx != NIL {
                    let e = self.entry(idx);
                    assert_eq!(e.prev, prev, "slot list back link");
                    assert!(e.when > self.elapsed);
                    assert!(e.when - self.elapsed <= MAX_RANGE_MS);
                    assert_eq!(self.list_for(e.when), List::Slot { level, slot });
                    prev = idx;
                    idx = e.next;
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, self.len, "entries on lists vs len");

        let occupied = self
            .slab
            .iter()
            .filter(|s| matches!(s, Slot::Occupied(_)))
            .count();
        assert_eq!(occupied, self.len, "occupied slab slots vs len");
        let mut free = 0;
        let mut idx = self.free_head;
        while idx != NIL {
            match self.slab[idx as usize] {
                Slot::Vacant { next_free, .. } => idx = next_free,
                Slot::Occupied(_) => panic!("free list reaches an occupied slot"),
            }
            free += 1;
        }
        assert_eq!(free + self.len, self.slab.len(), "free list length");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: u64 = 1_000;
    const MIN: u64 = 60 * SEC;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;
    /// A realistic unix-ms origin, deliberately not aligned to any level.
    const T0: u64 = 1_717_171_717_171;

    fn drain<T>(w: &mut Wheel<T>, now: u64) -> Vec<(u64, T)> {
        let mut out = Vec::new();
        let n = w.poll(now, &mut out);
        assert_eq!(n, out.len());
        out
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn entry_size() {
        // The figure quoted in the module docs; RAM budget is <= 150 B/entry.
        assert_eq!(std::mem::size_of::<Slot<[u8; 16]>>(), 40);
        assert_eq!(std::mem::size_of::<TimerKey>(), 8);
        assert_eq!(std::mem::size_of::<Option<TimerKey>>(), 8);
    }

    #[test]
    fn level_for_boundaries() {
        for when in 0..64 {
            assert_eq!(level_for(0, when), 0, "{when}");
        }
        for level in 1..NUM_LEVELS {
            let lo = 1u64 << (level as u32 * LEVEL_BITS);
            let hi = (lo << LEVEL_BITS) - 1;
            assert_eq!(level_for(0, lo - 1), level - 1, "{}", lo - 1);
            assert_eq!(level_for(0, lo), level, "{lo}");
            assert_eq!(level_for(0, lo + 1), level, "{}", lo + 1);
            assert_eq!(level_for(0, hi), level, "{hi}");
        }
        assert_eq!(level_for(0, 63), 0);
        assert_eq!(level_for(0, 64), 1);
        assert_eq!(level_for(0, 4095), 1);
        assert_eq!(level_for(0, 4096), 2);
        assert_eq!(level_for(0, (1 << 18) - 1), 2);
        assert_eq!(level_for(0, 1 << 18), 3);
        assert_eq!(level_for(0, 1 << 24), 4);
        assert_eq!(level_for(0, 1 << 30), 5);
        assert_eq!(level_for(0, (1 << 36) - 1), 5);
        // Beyond the top level's block: capped, the top level acts as a ring.
        assert_eq!(level_for(0, 1 << 36), 5);
        assert_eq!(level_for(0, u64::MAX), 5);
        assert_eq!(level_for((1 << 36) - 1, 1 << 36), 5);

        // The level depends on the differing digit, not the distance.
        assert_eq!(level_for(63, 64), 1);
        assert_eq!(level_for(64, 127), 0);
        assert_eq!(level_for(4095, 4096), 2);
        assert_eq!(level_for(4096, 4096 + 4095), 1);
        assert_eq!(level_for(100, 100), 0);
        for level in 0..NUM_LEVELS {
            let w = slot_width(level);
            let base = 7 * w * 64;
            assert_eq!(level_for(base, base + w), level);
            if level > 0 {
                assert_eq!(level_for(base, base + w - 1), level - 1);
            }
        }
    }

    #[test]
    fn slot_for_digits() {
        for pos in 0..64 {
            assert_eq!(slot_for(pos, 0), pos as usize);
        }
        for level in 0..NUM_LEVELS {
            for pos in 0..64u64 {
                let w = slot_width(level);
                let when = pos * w;
                assert_eq!(slot_for(when, level), pos as usize);
                assert_eq!(slot_for(when + w - 1, level), pos as usize);
                // Higher digits never leak into a level's slot.
                assert_eq!(slot_for(when + (64 * w) * 5, level), pos as usize);
            }
        }
        assert_eq!(slot_for(4095, 1), 63);
        assert_eq!(slot_for(4096, 1), 0);
        assert_eq!(slot_for(4096, 2), 1);
        assert_eq!(slot_for(1 << 36, 5), 0);
        assert_eq!(slot_for((1 << 36) - 1, 5), 63);
    }

    #[test]
    fn level_table() {
        assert_eq!(slot_width(0), 1);
        assert_eq!(slot_width(1), 64);
        assert_eq!(slot_width(2), 4_096);
        assert_eq!(slot_width(3), 262_144);
        assert_eq!(slot_width(4), 16_777_216);
        assert_eq!(slot_width(5), 1_073_741_824);
        assert_eq!(MAX_RANGE_MS, 67_645_734_912);
        const { assert!(MAX_RANGE_MS > 782 * DAY && MAX_RANGE_MS < 783 * DAY) };
    }

    #[test]
    fn next_expiration_is_slot_start() {
        let mut w = Wheel::new(0);
        w.insert(5 * 64 + 3, ());
        assert_eq!(
            w.next_expiration(),
            Some(Expiration {
                level: 1,
                slot: 5,
                deadline: 5 * 64
            })
        );
        w.insert(17, ());
        assert_eq!(
            w.next_expiration(),
            Some(Expiration {
                level: 0,
                slot: 17,
                deadline: 17
            })
        );

        // Top level wraps: at elapsed in top slot 60, a deadline in top slot
        // 60 + 10 = slot 6 of the next rotation.
        let mut w = Wheel::new(0);
        let width = slot_width(5);
        drain(&mut w, 60 * width + 123);
        w.insert(70 * width + 5, ());
        assert_eq!(
            w.next_expiration(),
            Some(Expiration {
                level: 5,
                slot: 6,
                deadline: 70 * width
            })
        );
        w.assert_invariants();
    }

    #[test]
    fn insert_poll_remove_basics() {
        let mut w = Wheel::new(T0);
        assert!(w.is_empty());
        assert_eq!(w.now(), T0);
        assert_eq!(w.next_deadline(), None);

        let a = w.insert(T0 + 10, "a");
        let b = w.insert(T0 + 5 * SEC, "b");
        let c = w.insert(T0 + 3 * DAY, "c");
        let d = w.insert(T0 + 10, "d");
        assert_eq!(w.len(), 4);
        assert_eq!(w.deadline(b), Some(T0 + 5 * SEC));
        assert_eq!(w.next_deadline(), Some(T0 + 10));
        w.assert_invariants();

        assert_eq!(w.remove(d), Some("d"));
        assert_eq!(w.remove(d), None);
        assert_eq!(w.len(), 3);

        assert!(drain(&mut w, T0 + 9).is_empty());
        assert_eq!(w.now(), T0 + 9);
        assert_eq!(drain(&mut w, T0 + 10), vec![(T0 + 10, "a")]);
        assert_eq!(w.deadline(a), None);
        assert_eq!(w.remove(a), None);

        assert_eq!(drain(&mut w, T0 + 5 * SEC), vec![(T0 + 5 * SEC, "b")]);
        assert_eq!(w.len(), 1);
        assert_eq!(w.remove(c), Some("c"));
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
        assert!(drain(&mut w, T0 + 10 * DAY).is_empty());
        assert_eq!(w.now(), T0 + 10 * DAY);
        w.assert_invariants();
    }

    #[test]
    fn fires_exactly_at_level_boundaries() {
        // Deadlines on and around every level boundary, seen from a
        // non-aligned start, must fire at their exact ms and not before.
        let mut w = Wheel::new(T0);
        let mut expect = Vec::new();
        for level in 0..NUM_LEVELS {
            let width = slot_width(level);
            for k in [1, 2, 63, 64, 65] {
                for delta in [-1i64, 0, 1] {
                    let when = (T0 + k * width).saturating_add_signed(delta);
                    if when > T0 && when <= T0 + MAX_RANGE_MS {
                        w.insert(when, when);
                        expect.push(when);
                    }
                }
            }
        }
        expect.sort_unstable();
        // All but `T0 + 1 - 1` and the seven top-level ones past the range.
        assert_eq!(expect.len(), NUM_LEVELS * 15 - 1 - 7);
        let mut fired = Vec::new();
        while let Some(next) = w.next_deadline() {
            assert!(next > w.now());
            // One ms short of the hint fires nothing.
            assert!(drain(&mut w, next - 1).is_empty());
            for (deadline, value) in drain(&mut w, next) {
                assert_eq!(deadline, value);
                assert_eq!(deadline, next);
                fired.push(deadline);
            }
            w.assert_invariants();
        }
        assert_eq!(fired, expect);
    }

    #[test]
    fn next_deadline_bounds_earliest() {
        let mut w = Wheel::new(0);
        w.insert(3 * HOUR + 17, ());
        let hint = w.next_deadline().unwrap();
        assert!(hint > 0 && hint <= 3 * HOUR + 17);
        let mut wakeups = 0;
        let mut now = 0;
        loop {
            let hint = w.next_deadline().unwrap();
            assert!(hint > now);
            now = hint;
            wakeups += 1;
            if !drain(&mut w, now).is_empty() {
                break;
            }
        }
        assert_eq!(now, 3 * HOUR + 17);
        assert!(wakeups <= NUM_LEVELS);
    }

    #[test]
    fn stale_keys_never_hit_other_entries() {
        let mut w = Wheel::new(0);
        let a = w.insert(100, 1);
        assert_eq!(w.remove(a), Some(1));
        // `b` reuses `a`'s slab slot.
        let b = w.insert(100, 2);
        assert_eq!(a.index, b.index);
        assert_ne!(a, b);
        assert_eq!(w.remove(a), None);
        assert_eq!(w.deadline(a), None);
        assert_eq!(w.len(), 1);

        // Fired keys go stale too, also after their slot is reused.
        assert_eq!(drain(&mut w, 100), vec![(100, 2)]);
        let c = w.insert(200, 3);
        assert_eq!(c.index, b.index);
        assert_eq!(w.remove(b), None);
        assert_eq!(w.deadline(c), Some(200));

        // A key from a bigger wheel is out of range here: just None.
        let mut big = Wheel::new(0);
        let mut last = None;
        for i in 0..10 {
            last = Some(big.insert(i, i));
        }
        assert_eq!(w.remove(last.unwrap()), None);
        assert_eq!(w.len(), 1);
        w.assert_invariants();
    }

    #[test]
    fn past_deadlines_fire_on_next_poll() {
        let mut w = Wheel::new(T0);
        drain(&mut w, T0 + 10 * SEC);
        let k = w.insert(T0 + SEC, "past");
        let b = w.insert(0, "before start");
        let n = w.insert(T0 + 10 * SEC, "now");
        assert_eq!(w.deadline(k), Some(T0 + 10 * SEC), "clamped to now");
        assert_eq!(w.deadline(b), Some(T0 + 10 * SEC));
        assert_eq!(w.deadline(n), Some(T0 + 10 * SEC));
        assert_eq!(w.next_deadline(), Some(T0 + 10 * SEC));
        // Polling "backwards" is polling at the current time.
        let out = drain(&mut w, T0);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|&(d, _)| d == T0 + 10 * SEC));
        assert_eq!(w.now(), T0 + 10 * SEC);
        assert!(w.is_empty());
    }

    #[test]
    fn far_deadlines_are_clamped() {
        let mut w = Wheel::new(T0);
        drain(&mut w, T0 + 12_345);
        let now = w.now();
        let k = w.insert(u64::MAX, "far");
        let j = w.insert(now + MAX_RANGE_MS + 1, "just beyond");
        let e = w.insert(now + MAX_RANGE_MS, "edge");
        let m = w.insert(now + 30 * DAY, "month");
        assert_eq!(w.deadline(k), Some(now + MAX_RANGE_MS));
        assert_eq!(w.deadline(j), Some(now + MAX_RANGE_MS));
        assert_eq!(w.deadline(e), Some(now + MAX_RANGE_MS));
        assert_eq!(w.deadline(m), Some(now + 30 * DAY));
        w.assert_invariants();
        assert_eq!(
            drain(&mut w, now + 30 * DAY),
            vec![(now + 30 * DAY, "month")]
        );
        assert!(drain(&mut w, now + MAX_RANGE_MS - 1).is_empty());
        let out = drain(&mut w, now + MAX_RANGE_MS);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|&(d, _)| d == now + MAX_RANGE_MS));

        // Near the top of u64 the clamp also prevents overflow.
        let mut w = Wheel::new(u64::MAX - 10);
        let k = w.insert(u64::MAX, ());
        assert_eq!(w.deadline(k), Some(u64::MAX));
        assert_eq!(drain(&mut w, u64::MAX).len(), 1);
    }

    #[test]
    fn top_level_ring_across_blocks() {
        // Move the clock near the end of a 2^36-ms block, then schedule into
        // the next block: top-level slots must wrap, not collide.
        let mut w = Wheel::new(0);
        let block = 1u64 << 36;
        let mut expect = Vec::new();
        drain(&mut w, block - slot_width(5) / 2);
        let now = w.now();
        for i in 0..63 {
            let when = now + i * slot_width(5) + 1;
            w.insert(when, when);
            expect.push(when);
        }
        w.insert(now + MAX_RANGE_MS, now + MAX_RANGE_MS);
        expect.push(now + MAX_RANGE_MS);
        // Now is in top-level slot 63: everything from the next block on
        // lands in slots "behind" it, i.e. on the ring's next turn.
        assert_eq!(slot_for(now, 5), 63);
        assert!(*expect.last().unwrap() > block + 60 * slot_width(5));
        w.assert_invariants();
        let mut fired = Vec::new();
        while let Some(next) = w.next_deadline() {
            for (d, v) in drain(&mut w, next) {
                assert_eq!(d, v);
                fired.push(d);
            }
            w.assert_invariants();
        }
        expect.sort_unstable();
        assert_eq!(fired, expect);
    }

    #[test]
    fn poll_at_most_chunks_in_order() {
        let mut w = Wheel::new(0);
        for i in 0..100u64 {
            w.insert(1000 - i * 7, i);
        }
        let late = w.insert(5000, 999);
        let mut all = Vec::new();
        let mut out = Vec::new();
        assert_eq!(w.poll_at_most(2000, 30, &mut out), 30);
        assert_eq!(w.now(), 2000);
        all.append(&mut out);
        assert_eq!(w.len(), 71);
        // Inserting now-due work lands behind the backlog.
        w.insert(10, 500);
        assert_eq!(w.poll_at_most(2000, 30, &mut out), 30);
        all.append(&mut out);
        assert_eq!(w.poll_at_most(1500, 100, &mut out), 41);
        all.append(&mut out);
        assert_eq!(w.poll_at_most(2000, 100, &mut out), 0);
        assert_eq!(all.len(), 101);
        assert!(all.windows(2).all(|p| p[0].0 <= p[1].0));
        assert_eq!(all.last(), Some(&(2000, 500)));
        assert_eq!(w.len(), 1);
        assert_eq!(w.poll_at_most(9000, 0, &mut out), 0);
        assert_eq!(w.next_deadline(), Some(5000));
        assert_eq!(w.remove(late), Some(999));
        w.assert_invariants();
    }

    #[test]
    fn cancel_from_ready_backlog() {
        let mut w = Wheel::new(0);
        let keys: Vec<_> = (0..10u64).map(|i| w.insert(i * 100, i)).collect();
        let mut out = Vec::new();
        w.poll_at_most(10_000, 2, &mut out);
        assert_eq!(out, vec![(0, 0), (100, 1)]);
        for i in [2, 5, 9] {
            assert_eq!(w.remove(keys[i]), Some(i as u64));
            w.assert_invariants();
        }
        out.clear();
        w.poll(10_000, &mut out);
        let got: Vec<u64> = out.iter().map(|&(_, v)| v).collect();
        assert_eq!(got, vec![3, 4, 6, 7, 8]);
    }

    #[test]
    fn slab_reuse_keeps_memory_flat() {
        let mut w = Wheel::with_capacity(0, 64);
        for round in 0..50u64 {
            let keys: Vec<_> = (0..64).map(|i| w.insert(round * 1000 + i, i)).collect();
            for k in keys.iter().step_by(2) {
                w.remove(*k).unwrap();
            }
            drain(&mut w, round * 1000 + 999);
            assert!(w.is_empty());
        }
        assert_eq!(w.slab.len(), 64);
    }

    #[test]
    fn debug_does_not_need_debug_values() {
        struct Opaque;
        let mut w = Wheel::new(5);
        w.insert(7, Opaque);
        let s = format!("{w:?}");
        assert!(s.contains("len: 1") && s.contains("now: 5"), "{s}");
    }

    // ---- model test -------------------------------------------------------

    #[derive(Clone, Debug)]
    enum Op {
        /// Deadline at `now + offset` (negative: in the past).
        Insert(i64),
        /// Deadline on, or one ms either side of, a slot boundary of `level`
        /// `slots` slots ahead of now, measured in wheel time.
        InsertAligned {
            level: usize,
            slots: u64,
            delta: i8,
        },
        /// Cancel the `n % issued`-th key ever issued (live or stale).
        Remove(usize),
        Poll(u64),
        /// Poll exactly at a slot boundary of `level`, `slots` ahead.
        PollAligned {
            level: usize,
            slots: u64,
            delta: i8,
        },
        PollAtMost(u64, usize),
        /// Poll at whatever `next_deadline()` says, as the engine will.
        PollNextDeadline,
        /// Poll at a time before `now()`.
        PollBackwards(u64),
    }

    fn offset() -> impl Strategy<Value = i64> {
        let day = DAY as i64;
        let max = MAX_RANGE_MS as i64;
        prop_oneof![
            4 => 0i64..64,
            4 => 0i64..10_000,
            4 => 0i64..(5 * day),
            3 => 0i64..(40 * day),
            2 => -(10 * day)..=0i64,
            1 => (max - 2)..(max + 2),
            1 => max..(3 * max),
        ]
    }

    fn advance() -> impl Strategy<Value = u64> {
        prop_oneof![
            3 => 0u64..4,
            3 => 0u64..100,
            3 => 0u64..20_000,
            2 => 0u64..DAY,
            2 => 0u64..(5 * DAY),
            1 => 0u64..(40 * DAY),
            1 => (MAX_RANGE_MS - 2)..(MAX_RANGE_MS + 2),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            10 => offset().prop_map(Op::Insert),
            4 => (0..NUM_LEVELS, 0u64..66, -1i8..=1).prop_map(|(level, slots, delta)| {
                Op::InsertAligned { level, slots, delta }
            }),
            5 => any::<usize>().prop_map(Op::Remove),
            4 => advance().prop_map(Op::Poll),
            2 => (0..NUM_LEVELS, 0u64..3, -1i8..=1).prop_map(|(level, slots, delta)| {
                Op::PollAligned { level, slots, delta }
            }),
            3 => (advance(), 0usize..6).prop_map(|(a, m)| Op::PollAtMost(a, m)),
            3 => Just(Op::PollNextDeadline),
            1 => (0u64..DAY).prop_map(Op::PollBackwards),
        ]
    }

    /// Runs `ops` against the shared oracle (`wheel::oracle`, also behind the fuzz target).
    fn run_model(start: u64, warp: u64, ops: &[Op]) {
        let mut o = oracle::Oracle::new(start, warp);
        for op in ops {
            match *op {
                Op::Insert(off) => o.insert(o.now().saturating_add_signed(off)),
                Op::InsertAligned {
                    level,
                    slots,
                    delta,
                } => o.insert(o.aligned(level, slots, delta)),
                Op::Remove(n) => o.remove(n),
                Op::Poll(adv) => o.poll(o.now() + adv),
                Op::PollAligned {
                    level,
                    slots,
                    delta,
                } => o.poll(o.aligned(level, slots, delta)),
                Op::PollAtMost(adv, max) => o.poll_at_most(o.now() + adv, max),
                Op::PollNextDeadline => o.poll_next_deadline(),
                Op::PollBackwards(back) => o.poll(o.now().saturating_sub(back)),
            }
        }
        o.finish();
    }

    proptest! {
        // Default 256 cases keeps this module well under the test budget;
        // set PROPTEST_CASES for a deeper run.
        #[test]
        fn model_matches_oracle(
            start in prop_oneof![Just(0u64), 0u64..(1 << 42), Just(T0)],
            warp in prop_oneof![
                Just(0u64),
                0u64..(1 << 37),
                ((1u64 << 36) - 20 * DAY)..(1 << 36),
            ],
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            run_model(start, warp, &ops);
        }
    }
}
