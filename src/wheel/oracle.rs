//! The wheel's test oracle: a [`Wheel<u64>`] driven side by side with a `BTreeSet<(deadline,
//! id)>` model of its documented contract, shared by the property test in `wheel.rs` and the
//! fuzz target `fuzz/fuzz_targets/wheel.rs` (built with the `fuzzing` feature), so that the two
//! check the same thing and a fix to the model reaches both.
//!
//! Operations enter as absolute times through [`Oracle`]'s methods (each driver turns its own
//! generated input into them, usually relative to [`Oracle::now`]); every call applies the
//! operation to the wheel and to the model and panics on the first disagreement, then checks the
//! wheel's structural invariants. Nothing leaves but the panic.
//!
//! The contract the model follows (see the module docs of `wheel`): deadlines are clamped into
//! `[now, now + MAX_RANGE_MS]` at insert; a poll moves out every entry with deadline <= now in
//! non-decreasing deadline order (ties in any order); `poll_at_most` moves out the earliest `max`
//! of them; time never goes backwards; stale keys find and remove nothing; `next_deadline` is a
//! lower bound on the earliest deadline, exact when something is due and after now when nothing
//! is.

use std::collections::{BTreeSet, HashMap};

use super::{TimerKey, Wheel, LEVEL_BITS, MAX_RANGE_MS, NUM_LEVELS};

/// A wheel and its model, checked against each other after every operation.
pub struct Oracle {
    wheel: Wheel<u64>,
    start: u64,
    /// The model's clock: the latest poll target, never going back.
    now: u64,
    /// (deadline, id) of everything scheduled, after clamping.
    live: BTreeSet<(u64, u64)>,
    deadline_of: HashMap<u64, u64>,
    /// Every key ever issued (live or stale), with its id, in issue order.
    keys: Vec<(TimerKey, u64)>,
    next_id: u64,
    out: Vec<(u64, u64)>,
}

impl Oracle {
    /// A wheel started at `start`, then advanced by `warp` while still empty (so the operations
    /// can begin anywhere in wheel time, e.g. just before a top-level block boundary).
    pub fn new(start: u64, warp: u64) -> Oracle {
        let mut wheel = Wheel::new(start);
        assert_eq!(wheel.now(), start);
        let begin = start.saturating_add(warp);
        let mut out = Vec::new();
        assert_eq!(wheel.poll(begin, &mut out), 0);
        assert!(out.is_empty() && wheel.is_empty() && wheel.next_deadline().is_none());
        Oracle {
            wheel,
            start,
            now: begin,
            live: BTreeSet::new(),
            deadline_of: HashMap::new(),
            keys: Vec::new(),
            next_id: 0,
            out,
        }
    }

    /// The current time, as the model has it (the wheel is checked to agree).
    pub fn now(&self) -> u64 {
        self.now
    }

    /// The wheel's `next_deadline`, for drivers that poll where the scheduler would.
    pub fn next_deadline(&self) -> Option<u64> {
        self.wheel.next_deadline()
    }

    /// The absolute time `slots` slot widths of `level` (taken modulo the level count) past the
    /// slot boundary at or before now, nudged by `delta` ms: where the level arithmetic has its
    /// edges.
    pub fn aligned(&self, level: usize, slots: u64, delta: i8) -> u64 {
        let shift = (level % NUM_LEVELS) as u32 * LEVEL_BITS;
        let rel = self.now - self.start;
        // Bits shifted out past the top only happen for starts near u64::MAX; any time will do
        // there, as long as nothing panics.
        let slot_start = (rel >> shift).saturating_add(slots) << shift;
        self.start
            .saturating_add(slot_start)
            .saturating_add_signed(i64::from(delta))
    }

    /// Schedules the next id at absolute `when`.
    pub fn insert(&mut self, when: u64) {
        let id = self.next_id;
        self.next_id += 1;
        let key = self.wheel.insert(when, id);
        let effective = when.clamp(self.now, self.now.saturating_add(MAX_RANGE_MS));
        assert_eq!(
            self.wheel.deadline(key),
            Some(effective),
            "insert at {when}"
        );
        self.live.insert((effective, id));
        self.deadline_of.insert(id, effective);
        self.keys.push((key, id));
        self.check();
    }

    /// Cancels the `n % issued`-th key ever issued, live or stale (nothing when none was).
    pub fn remove(&mut self, n: usize) {
        let Some((key, id)) = self.key(n) else { return };
        match self.deadline_of.remove(&id) {
            Some(d) => {
                assert_eq!(self.wheel.deadline(key), Some(d), "deadline of live {id}");
                assert_eq!(self.wheel.remove(key), Some(id), "removing live {id}@{d}");
                assert!(self.live.remove(&(d, id)));
            }
            None => {
                assert_eq!(self.wheel.deadline(key), None, "deadline of stale {id}");
                assert_eq!(
                    self.wheel.remove(key),
                    None,
                    "stale key of {id} removed something"
                );
            }
        }
        self.check();
    }

    /// Looks up the `n % issued`-th key's deadline.
    pub fn deadline(&mut self, n: usize) {
        let Some((key, id)) = self.key(n) else { return };
        assert_eq!(
            self.wheel.deadline(key),
            self.deadline_of.get(&id).copied(),
            "deadline of {id}"
        );
    }

    /// Polls at absolute `target` (a time before now counts as now).
    pub fn poll(&mut self, target: u64) {
        self.poll_at_most(target, usize::MAX);
    }

    /// Polls at absolute `target`, moving out at most `max` entries.
    pub fn poll_at_most(&mut self, target: u64, max: usize) {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let n = if max == usize::MAX {
            self.wheel.poll(target, &mut out)
        } else {
            self.wheel.poll_at_most(target, max, &mut out)
        };
        assert_eq!(n, out.len());
        assert!(n <= max);
        self.check_fired(target, max, &out);
        self.out = out;
        self.check();
    }

    /// Polls at whatever `next_deadline` says, as the scheduler does.
    pub fn poll_next_deadline(&mut self) {
        if let Some(target) = self.wheel.next_deadline() {
            self.poll(target);
        }
    }

    /// The last checks: every key ever issued still agrees on its deadline, and draining by
    /// `next_deadline`, as the scheduler does, empties the wheel in order with at most five
    /// extra wake-ups per timer (one per level it cascades through).
    pub fn finish(mut self) {
        for &(key, id) in &self.keys {
            assert_eq!(self.wheel.deadline(key), self.deadline_of.get(&id).copied());
        }
        let budget = 6 * self.live.len() + 1;
        let mut last = 0;
        let mut steps = 0;
        let mut out = Vec::new();
        while let Some(target) = self.wheel.next_deadline() {
            steps += 1;
            assert!(
                steps <= budget,
                "next_deadline does not converge on the deadlines"
            );
            out.clear();
            self.wheel.poll(target, &mut out);
            for &(d, id) in &out {
                assert!(d >= last, "drained out of order");
                last = d;
                assert!(
                    self.live.remove(&(d, id)),
                    "drained {id}@{d}, not scheduled so"
                );
            }
        }
        assert!(self.live.is_empty() && self.wheel.is_empty());
        self.wheel.assert_invariants();
    }

    fn key(&self, n: usize) -> Option<(TimerKey, u64)> {
        (!self.keys.is_empty()).then(|| self.keys[n % self.keys.len()])
    }

    /// What a poll at `target` moved out, against the model's due entries.
    fn check_fired(&mut self, target: u64, max: usize, fired: &[(u64, u64)]) {
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

    /// What must hold after every operation.
    fn check(&self) {
        assert_eq!(self.wheel.now(), self.now);
        assert_eq!(self.wheel.len(), self.live.len());
        assert_eq!(self.wheel.is_empty(), self.live.is_empty());
        match (self.wheel.next_deadline(), self.live.first()) {
            (None, None) => {}
            (Some(hint), Some(&(min, _))) => {
                assert!(hint <= min, "next_deadline {hint} after the earliest {min}");
                if min <= self.now {
                    assert_eq!(hint, min, "something is due: next_deadline must be exact");
                } else {
                    assert!(
                        hint > self.now,
                        "next_deadline {hint} not after now {}",
                        self.now
                    );
                }
            }
            (hint, min) => panic!("next_deadline {hint:?} vs oracle {min:?}"),
        }
        self.wheel.assert_invariants();
    }
}
