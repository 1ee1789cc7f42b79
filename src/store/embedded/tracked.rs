//! Tracked trees: every sled tree of the store, behind a write gate that an online backup can
//! close for an instant, and reporting which keys change while a backup runs.
//!
//! `SledStore` never holds a bare `sled::Tree`: each tree is opened through [`Tree::open`], which
//! registers it with the store's [`Tracker`], and every mutation (`insert`, `remove`,
//! `write_in_order` of a [`Batch`]) goes through this wrapper. A mutation holds the gate's shared
//! side for just that one call (never across calls, so a writer can never wait on itself),
//! and afterwards, while a backup is tracking, adds the keys it wrote to the tracker's dirty
//! list. Reads go straight to sled. `backup` uses the registry, the dirty list and the
//! gate's exclusive side to take a consistent snapshot without stopping the engine for more
//! than an instant (see that module for the argument). Outside a backup a mutation costs one
//! uncontended shared lock and one atomic load. Because [`Tree::open`] registers the tree, a
//! tree added later is in every backup and compaction without more code. A mutation sled
//! refuses with an I/O error is noted here as the store's failure (`SledStore::health`).
//! Batches are written in order, not atomically: [`Tree::write_in_order`] says why.

use std::ops::RangeBounds;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};

use sled::{IVec, Iter};

/// A key some mutation wrote while a backup was tracking: (tree number, key).
pub(crate) type DirtyKey = (u8, IVec);

/// The write gate, the tracked-tree registry and the dirty list of one store.
#[derive(Default)]
pub struct Tracker {
    gate: RwLock<()>,
    tracking: AtomicBool,
    dirty: Mutex<Vec<DirtyKey>>,
    /// Every tree opened through [`Tree::open`], numbered by position.
    trees: Mutex<Vec<(String, sled::Tree)>>,
    /// The first write a tree refused with an I/O error (disk full, failing disk): sled's
    /// errors are sticky, so the store is failed from then on (`SledStore::health`).
    write_failure: std::sync::OnceLock<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tracker {
    /// Notes a mutation's I/O error (or sled's report of a corrupt store) as the store's
    /// failure, and passes the result on.
    fn checked<T>(&self, result: sled::Result<T>) -> sled::Result<T> {
        if let Err(
            e @ (sled::Error::Io(_)
            | sled::Error::Corruption { .. }
            | sled::Error::ReportableBug(_)),
        ) = &result
        {
            let _ = self.write_failure.set(format!("storage: {e}"));
        }
        result
    }

    /// The first write failure, if any.
    pub(crate) fn write_failure(&self) -> Option<&String> {
        self.write_failure.get()
    }

    fn touched(&self, tree: u8, keys: impl IntoIterator<Item = IVec>) {
        // Checked after the mutation: a key written before tracking began is seen by the
        // backup's full scan (which starts after tracking began), one written after is listed.
        if self.tracking.load(Ordering::Acquire) {
            lock(&self.dirty).extend(keys.into_iter().map(|k| (tree, k)));
        }
    }

    /// Waits until no mutation is in progress and holds every writer off until the guard
    /// is dropped.
    pub(crate) fn close_gate(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts listing dirty keys; `false` when a backup is already tracking. Call with the
    /// gate closed, so that every mutation after it is listed.
    pub(crate) fn start_tracking(&self, _gate: &RwLockWriteGuard<'_, ()>) -> bool {
        self.tracking
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Stops listing and forgets what was listed.
    pub(crate) fn stop_tracking(&self) {
        self.tracking.store(false, Ordering::Release);
        lock(&self.dirty).clear();
    }

    /// Takes the keys listed so far (each at most once, in tree and key order).
    pub(crate) fn take_dirty(&self) -> Vec<DirtyKey> {
        let mut keys = std::mem::take(&mut *lock(&self.dirty));
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// How many keys are listed (with repeats).
    pub(crate) fn dirty_len(&self) -> usize {
        lock(&self.dirty).len()
    }

    /// The tracked trees, by number.
    pub(crate) fn trees(&self) -> Vec<(String, sled::Tree)> {
        lock(&self.trees).clone()
    }
}

/// A sled tree whose mutations pass the write gate and are tracked during a backup.
#[derive(Clone)]
pub struct Tree {
    tree: sled::Tree,
    number: u8,
    tracker: Arc<Tracker>,
}

impl Tree {
    /// Opens (or creates) the tree `name` and registers it with `tracker`.
    pub fn open(db: &sled::Db, tracker: &Arc<Tracker>, name: &str) -> sled::Result<Tree> {
        let tree = db.open_tree(name)?;
        let mut trees = lock(&tracker.trees);
        let number = match trees.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                trees.push((name.to_string(), tree.clone()));
                trees.len() - 1
            }
        };
        Ok(Tree {
            tree,
            number: u8::try_from(number).expect("fewer than 256 trees"),
            tracker: tracker.clone(),
        })
    }

    fn pass_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.tracker.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert<K, V>(&self, key: K, value: V) -> sled::Result<Option<IVec>>
    where
        K: AsRef<[u8]>,
        V: Into<IVec>,
    {
        let _open = self.pass_gate();
        let key = key.as_ref();
        let old = self.tracker.checked(self.tree.insert(key, value))?;
        self.tracker.touched(self.number, [IVec::from(key)]);
        Ok(old)
    }

    pub fn remove<K: AsRef<[u8]>>(&self, key: K) -> sled::Result<Option<IVec>> {
        let _open = self.pass_gate();
        let key = key.as_ref();
        let old = self.tracker.checked(self.tree.remove(key))?;
        self.tracker.touched(self.number, [IVec::from(key)]);
        Ok(old)
    }

    /// Applies a batch's writes in order, each as its own sled operation, as one step for the
    /// gate. **Not atomic**, on purpose: sled's atomic `apply_batch` takes a process-wide
    /// exclusive lock (`concurrency_control::write`), and once any batch has run in a process,
    /// every later read and write of every tree takes that lock's shared side — so each batch
    /// stopped the committer, the fan-out, the delivery writer and every admission read for as
    /// long as it ran, and they in turn held the writer off: under fan-out that was the
    /// bottleneck (the profile showed the writer's voluntary sleeps in
    /// `concurrency_control::write`, and the process using ~1.1 of 2 cores while deliveries
    /// lagged by seconds). Without it sled runs lock-free. Writes of one thread reach sled's
    /// log in order and recovery replays a prefix of the log, so callers order their writes
    /// such that any prefix is a state recovery handles (the store's write functions say how
    /// each does: `apply_delivery_writes` new schedule entries first and superseded ones last;
    /// the event append inbox marks, then events, then idempotency entries; purges indexes and
    /// attempts before the record). What a batch gave — atomicity within one tree — was never
    /// relied on across trees anyway.
    ///
    /// A/B on the same machine, quick load-bench runs: the 10-webhook delivery ceiling once
    /// ingest stops went from 19.7 k to 27–28 k/s, one webhook from 7.2 k to 11–14 k/s kept up,
    /// single-event ingest from 53–55 k to 57–59 k/s, and the paced cost at 250 events/s from
    /// 1.6 to 0.76 ms of engine CPU per event (sled's IO threads had been woken by the lock's
    /// hand-offs).
    pub fn write_in_order(&self, batch: Batch) -> sled::Result<()> {
        let _open = self.pass_gate();
        for (key, value) in batch.writes {
            let result = match value {
                Some(value) => self.tree.insert(&key, value),
                None => self.tree.remove(&key),
            };
            self.tracker.checked(result)?;
            self.tracker.touched(self.number, [key]);
        }
        Ok(())
    }

    pub fn get<K: AsRef<[u8]>>(&self, key: K) -> sled::Result<Option<IVec>> {
        self.tree.get(key)
    }

    pub fn contains_key<K: AsRef<[u8]>>(&self, key: K) -> sled::Result<bool> {
        self.tree.contains_key(key)
    }

    pub fn iter(&self) -> Iter {
        self.tree.iter()
    }

    pub fn range<K, R>(&self, range: R) -> Iter
    where
        K: AsRef<[u8]>,
        R: RangeBounds<K>,
    {
        self.tree.range(range)
    }

    pub fn scan_prefix<P: AsRef<[u8]>>(&self, prefix: P) -> Iter {
        self.tree.scan_prefix(prefix)
    }

    pub fn first(&self) -> sled::Result<Option<(IVec, IVec)>> {
        self.tree.first()
    }

    pub fn last(&self) -> sled::Result<Option<(IVec, IVec)>> {
        self.tree.last()
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

/// sled's batch, remembering its keys so that a tracking backup can list them.
#[derive(Default)]
pub struct Batch {
    /// (key, new value or `None` for a removal), in the order they are to be applied.
    writes: Vec<(IVec, Option<IVec>)>,
}

impl Batch {
    pub fn insert<K: Into<IVec>, V: Into<IVec>>(&mut self, key: K, value: V) {
        self.writes.push((key.into(), Some(value.into())));
    }

    pub fn remove<K: Into<IVec>>(&mut self, key: K) {
        self.writes.push((key.into(), None));
    }

    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_listed_only_while_tracking() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tracker = Arc::new(Tracker::default());
        let a = Tree::open(&db, &tracker, "a").unwrap();
        let b = Tree::open(&db, &tracker, "b").unwrap();
        a.insert(b"before", b"1").unwrap();
        assert!(tracker.take_dirty().is_empty());
        {
            let gate = tracker.close_gate();
            assert!(tracker.start_tracking(&gate));
            assert!(!tracker.start_tracking(&gate), "one backup at a time");
        }
        a.insert(b"k1", b"1").unwrap();
        b.remove(b"gone").unwrap();
        let mut batch = Batch::default();
        batch.insert(b"k2".as_ref(), b"2".as_ref());
        batch.remove(b"k1".as_ref());
        a.write_in_order(batch).unwrap();
        assert_eq!(
            tracker.take_dirty(),
            vec![
                (0, IVec::from(b"k1")),
                (0, IVec::from(b"k2")),
                (1, IVec::from(b"gone"))
            ]
        );
        tracker.stop_tracking();
        a.insert(b"after", b"1").unwrap();
        assert!(tracker.take_dirty().is_empty());
        let names: Vec<String> = tracker.trees().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b"]);
    }
}
