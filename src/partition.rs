//! Partitions of accounts, and which of them this node serves.
//!
//! Every account belongs to one of [`PARTITIONS`] fixed partitions ([`partition_of`]: FNV-1a
//! of its id, the same on every node and version). On the embedded store one node serves them
//! all. On PostgreSQL, nodes divide them (`store::postgres::ownership`): a node dispatches,
//! schedules and writes the deliveries of the accounts in the partitions it holds, and nothing
//! else, so each account's rate limiter, timing-wheel entries and FIFO queues have one owner.
//!
//! [`Shares`] is this node's view, written by the ownership loop (through the engine's
//! hand-over, `crate::handover`) and read lock-free on the hot path: the dispatcher asks
//! [`Shares::serves`] before every attempt, the PostgreSQL store fences a write with the
//! epochs from [`Shares::epoch`], the front door forwards a request for an account this node
//! does not hold. A partition is *serving* (dispatch and write), *draining* (handed over: no
//! new attempt starts, but what is in flight may still write its outcome at the old epoch) or
//! not held.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::ids::AccountId;

/// How many partitions accounts are divided into. Fixed: changing it would move accounts.
pub const PARTITIONS: u16 = 256;

/// A partition's number, `0 .. PARTITIONS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition(u16);

impl Partition {
    /// `n` if it is a partition number.
    pub fn new(n: u16) -> Option<Partition> {
        (n < PARTITIONS).then_some(Partition(n))
    }

    /// A partition number as stored (`partition_id smallint`), if it is one.
    pub fn from_stored(n: i16) -> Option<Partition> {
        u16::try_from(n).ok().and_then(Partition::new)
    }

    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    pub fn get(self) -> u16 {
        self.0
    }

    /// Every partition, in order.
    pub fn all() -> impl Iterator<Item = Partition> {
        (0..PARTITIONS).map(Partition)
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The partition `account` belongs to: FNV-1a of its id (fixed here, not a std hasher, so that
/// every node of every version agrees, and the stored `partition_id` columns stay true).
pub fn partition_of(account: &AccountId) -> Partition {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in account.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Partition((h % u64::from(PARTITIONS)) as u16)
}

/// The three top bits of a slot: its state; the rest: the epoch it was acquired at.
const SERVING: u64 = 1 << 63;
const DRAINING: u64 = 1 << 62;
const LOADING: u64 = 1 << 61;
const EPOCH: u64 = LOADING - 1;
const HELD: u64 = SERVING | DRAINING | LOADING;

/// This node's partitions: for each, not held, serving at an epoch, or draining at it. One
/// atomic word per partition, so readers never lock; one writer (the hand-over) changes them.
/// Held without serving: being loaded after a gain, or being handed over.
pub struct Shares {
    slots: Vec<AtomicU64>,
}

impl Shares {
    /// Every partition served at epoch 0: one node alone (the embedded store, and the tests).
    pub fn all() -> Shares {
        Shares {
            slots: (0..PARTITIONS).map(|_| AtomicU64::new(SERVING)).collect(),
        }
    }

    /// None held yet: a node of a cluster before its first ownership round.
    pub fn none() -> Shares {
        Shares {
            slots: (0..PARTITIONS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn load(&self, p: Partition) -> u64 {
        self.slots[p.index()].load(Ordering::Acquire)
    }

    /// Starts serving `p`, acquired at `epoch`.
    pub fn serve(&self, p: Partition, epoch: i64) {
        let epoch = u64::try_from(epoch).unwrap_or(0) & EPOCH;
        self.slots[p.index()].store(SERVING | epoch, Ordering::Release);
    }

    /// Holds `p` at `epoch` without serving it yet (its work is being loaded): its writes are
    /// fenced at that epoch, but no attempt starts and no request is taken.
    pub fn hold(&self, p: Partition, epoch: i64) {
        let epoch = u64::try_from(epoch).unwrap_or(0) & EPOCH;
        self.slots[p.index()].store(LOADING | epoch, Ordering::Release);
    }

    /// Serves `p` once its load is done, if it is still loading at `epoch` (not handed over,
    /// lost or gained again meanwhile); whether it now serves.
    pub fn loaded(&self, p: Partition, epoch: i64) -> bool {
        let epoch = u64::try_from(epoch).unwrap_or(0) & EPOCH;
        self.slots[p.index()]
            .compare_exchange(
                LOADING | epoch,
                SERVING | epoch,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Stops starting attempts in `p` (it is being handed over); writes keep its epoch.
    pub fn drain(&self, p: Partition) {
        let slot = &self.slots[p.index()];
        let _ = slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
            (now & HELD != 0).then_some(DRAINING | (now & EPOCH))
        });
    }

    /// Lets `p` go (released, or taken over).
    pub fn forget(&self, p: Partition) {
        self.slots[p.index()].store(0, Ordering::Release);
    }

    /// Whether this node starts attempts for `account`'s deliveries and takes its requests.
    pub fn serves(&self, account: &AccountId) -> bool {
        self.serves_partition(partition_of(account))
    }

    pub fn serves_partition(&self, p: Partition) -> bool {
        self.load(p) & SERVING != 0
    }

    /// The epoch this node holds the stored partition `p` at; `None` for one it does not hold
    /// (or a number that is no partition).
    pub fn stored_epoch(&self, p: i16) -> Option<i64> {
        Partition::from_stored(p).and_then(|p| self.epoch(p))
    }

    /// The epoch this node holds `p` at (serving or draining): what its writes are fenced by.
    pub fn epoch(&self, p: Partition) -> Option<i64> {
        let v = self.load(p);
        (v & HELD != 0).then_some((v & EPOCH) as i64)
    }

    /// How many partitions are served (not counting those draining).
    pub fn serving(&self) -> usize {
        Partition::all()
            .filter(|p| self.serves_partition(*p))
            .count()
    }
}

impl std::fmt::Debug for Shares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shares")
            .field("serving", &self.serving())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_spread_over_every_partition_and_always_land_in_the_same_one() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..20_000 {
            let a = AccountId::parse(&format!("acc_{i}")).unwrap();
            let p = partition_of(&a);
            assert!(p.get() < PARTITIONS);
            assert_eq!(partition_of(&a), p);
            seen.insert(p);
        }
        assert_eq!(seen.len(), PARTITIONS as usize);
        // Fixed forever: the stored partition_id columns depend on it.
        let at = |id: &str| partition_of(&AccountId::parse(id).unwrap()).get();
        assert_eq!((at("acme"), at("acc_std")), (15, 124));
    }

    #[test]
    fn a_partition_is_served_then_drained_then_forgotten_and_keeps_its_epoch_while_draining() {
        let s = Shares::none();
        let a = AccountId::parse("acme").unwrap();
        let p = partition_of(&a);
        assert!(!s.serves(&a));
        assert_eq!(s.epoch(p), None);
        s.serve(p, 7);
        assert!(s.serves(&a));
        assert_eq!(s.epoch(p), Some(7));
        assert_eq!(s.serving(), 1);
        s.drain(p);
        assert!(
            !s.serves(&a),
            "no new attempt starts while it is handed over"
        );
        assert_eq!(s.epoch(p), Some(7), "what is in flight still writes");
        s.forget(p);
        assert_eq!(s.epoch(p), None);
        s.hold(p, 9);
        assert!(!s.serves(&a), "loading: not served yet");
        assert_eq!(
            s.epoch(p),
            Some(9),
            "but its recovery writes are fenced at 9"
        );
        assert!(!s.loaded(p, 8), "a load of another epoch does not serve it");
        assert!(s.loaded(p, 9));
        assert!(s.serves(&a));
        // Handed over while it loads: the load's end does not serve it again.
        s.hold(p, 10);
        s.drain(p);
        assert!(!s.loaded(p, 10));
        assert!(!s.serves(&a));
        assert_eq!(s.epoch(p), Some(10));
        s.forget(p);
        // Draining what is not held does not make it held.
        s.drain(p);
        assert_eq!(s.epoch(p), None);
        let all = Shares::all();
        assert!(all.serves(&a));
        assert_eq!(all.serving(), PARTITIONS as usize);
    }
}
