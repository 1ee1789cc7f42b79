//! Retention: the thread that removes delivery logs and events older than `storage.retention`.
//!
//! One OS thread (`kyberhook-retention`), so the async workers never wait for it: every
//! [`pass_interval`] it computes the cutoff and runs a pass ([`Purger::pass`]) — a pass ends
//! when the backlog is gone, not at a fixed budget, so the purge keeps up with any delivery
//! rate the engine sustains and the data dir levels off at about `retention + interval` worth
//! of history. Deliveries are deleted through the delivery writer, which alone writes them:
//! this thread only *plans* each batch (a read-only scan, [`crate::store::Storage::plan_purge`]) and sends the
//! plan as a command; the writer re-checks every planned record and deletes only those still
//! stored as planned ([`crate::store::Storage::apply_purge`]), so a manual retry that the writer answered 202
//! while the plan was being made is never deleted afterwards. The events no delivery needs any
//! more are dropped on this thread (under the store's chunk lock). Nothing enters but the
//! clock; what leaves is plans for the writer, event deletions and the
//! `kyberhook_retention_*` metrics. [`Retention::stop`] ends it between two batches.
//!
//! A pass ([`crate::store::purge_before_with`]) walks `deliveries` from the front up to the
//! cutoff in batches of 1 024 keys. Each batch is *planned* here, read-only: the finished
//! deliveries whose last change (`updated_ms`) is before the cutoff too, each with the
//! record's bytes as read and its attempts' keys; open ones, and finished ones changed since
//! the cutoff (a manual retry or a recover stamps `updated_ms`), are stepped over. The plan
//! goes to the delivery writer as `Command::Purge`, applied right after the drain it arrived
//! in: a planned delivery is deleted only if its record is still stored byte for byte as
//! planned, tree by tree, the record last (see `store/embedded/purge.rs`). This closes the
//! race the purge had when it deleted on its own thread: a retry the writer answered 202
//! between the purge's read and its delete was deleted with the delivery. Now the retry is
//! applied either before the re-check (which then sees a changed record and keeps it) or
//! after the delete (and finds no delivery: 404, nothing acknowledged). The writer is held for
//! one batch's deletes at a time (the `kyberhook_retention_writer_seconds` histogram): this
//! thread plans the next batch while the writer applies the last one and sends it only once
//! that one is answered, so the scan, the decoding and the attempts' range scan overlap the
//! deletes, but a pass never queues more than one batch on the writer.
//!
//! Then the log's chunks below the cutoff, 256 per batch, here: an event goes when it has no
//! inbox mark and no delivery left. Chunks are rewritten in two places — here and when an
//! account is deleted (on the writer) — and one chunk holds many events, so both hold the
//! store's chunk lock from the first read to the last write (two rewrites of one chunk at once
//! would each write back what it read, bringing back the events the other removed); the
//! committer only appends chunks under new keys and never takes it. Last, the statistics of
//! hours that ended before the cutoff.
//!
//! On shutdown retention is stopped first (`Engine::shutdown`), since its writer handle keeps
//! the writer open. `Engine::purger` hands out the same pass with a cutoff of the caller's
//! choosing; tests use [`Purger::pass_with`], which calls back between plan and apply, to put a
//! retry in exactly that gap.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, RecvTimeoutError, Sender};

use crate::delivery::{Deliveries, DeliveryError};
use crate::partition::{Partition, Shares};
use crate::store::{Purged, Storage};

/// How often a pass runs for a given retention: a twentieth of it (so the history kept
/// exceeds the retention by at most 5 %), at least every minute and at most every second.
pub fn pass_interval(retention: Duration) -> Duration {
    (retention / 20).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Runs retention passes: plans on the calling thread, deletes through the delivery writer.
/// Holds a writer handle, so the writer runs as long as a `Purger` exists.
#[derive(Clone)]
pub struct Purger {
    store: Arc<dyn Storage>,
    deliveries: Deliveries,
}

impl Purger {
    pub fn new(store: Arc<dyn Storage>, deliveries: Deliveries) -> Purger {
        Purger { store, deliveries }
    }

    /// Purges what was created and last changed before `cutoff_ms` (unix ms); `go_on` is asked
    /// before each batch. Blocking: waits for the writer to apply each batch.
    pub fn pass(&self, cutoff_ms: u64, go_on: &dyn Fn() -> bool) -> Result<Purged, DeliveryError> {
        self.pass_with(cutoff_ms, go_on, &mut || {})
    }

    /// [`Purger::pass`], calling `between` after each batch is planned and before the writer
    /// applies it — the window in which a retry can come in, which tests hold open.
    pub fn pass_with(
        &self,
        cutoff_ms: u64,
        go_on: &dyn Fn() -> bool,
        between: &mut dyn FnMut(),
    ) -> Result<Purged, DeliveryError> {
        crate::store::purge_before_with(
            &*self.store,
            cutoff_ms,
            go_on,
            |plan| {
                between();
                self.deliveries.send_purge(plan)
            },
            |sent| sent.wait(),
        )
    }
}

/// The running retention thread.
pub struct Retention {
    stopping: Arc<AtomicBool>,
    /// Dropped to wake the thread from its wait.
    wake: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    purger: Purger,
}

impl Retention {
    ///
    /// With `shares` (nodes dividing the work), a pass runs only while this node serves
    /// partition 0: one node of the cluster drops old days for all.
    pub fn start(purger: Purger, retention: Duration, shares: Option<Arc<Shares>>) -> Retention {
        let stopping = Arc::new(AtomicBool::new(false));
        let (wake, woken) = channel::bounded::<()>(1);
        let interval = pass_interval(retention);
        let flag = stopping.clone();
        let worker = purger.clone();
        let thread = std::thread::Builder::new()
            .name("kyberhook-retention".into())
            .spawn(move || loop {
                match woken.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let first = Partition::new(0).expect("partition 0");
                if shares.as_ref().map_or(true, |s| s.serves_partition(first)) {
                    pass(&worker, retention, &flag);
                }
            })
            .expect("spawning the retention thread");
        Retention {
            stopping,
            wake: Some(wake),
            thread: Some(thread),
            purger,
        }
    }

    /// Another handle on what the thread runs (see [`crate::Engine::purger`]).
    pub fn purger(&self) -> Purger {
        self.purger.clone()
    }

    /// Stops the thread (a pass in progress ends after its current batch) and waits for it.
    /// Blocking.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::Release);
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Retention {
    /// An engine dropped without [`crate::Engine::shutdown`] does not leave the thread running.
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        drop(self.wake.take());
    }
}

fn pass(purger: &Purger, retention: Duration, stopping: &AtomicBool) {
    let started = Instant::now();
    let cutoff = crate::model::now_ms().saturating_sub(retention.as_millis() as u64);
    match purger.pass(cutoff, &|| !stopping.load(Ordering::Acquire)) {
        Ok(purged) => {
            let secs = started.elapsed().as_secs_f64();
            metrics::histogram!("kyberhook_retention_pass_seconds").record(secs);
            metrics::counter!("kyberhook_retention_deliveries_purged_total")
                .increment(purged.deliveries as u64);
            metrics::counter!("kyberhook_retention_events_purged_total")
                .increment(purged.events as u64);
            if purged.deliveries > 0 || purged.events > 0 {
                tracing::debug!(
                    deliveries = purged.deliveries,
                    attempts = purged.attempts,
                    events = purged.events,
                    seconds = secs,
                    "purged history past retention"
                );
            }
        }
        // Shutting down: the writer has stopped taking commands.
        Err(DeliveryError::Closed) => {}
        Err(e) => tracing::warn!(error = %e, "retention purge failed; retried at the next pass"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_run_often_enough_for_the_retention() {
        assert_eq!(
            pass_interval(Duration::from_secs(30 * 86_400)),
            Duration::from_secs(60)
        );
        assert_eq!(
            pass_interval(Duration::from_secs(600)),
            Duration::from_secs(30)
        );
        assert_eq!(
            pass_interval(Duration::from_secs(5)),
            Duration::from_secs(1)
        );
    }
}
