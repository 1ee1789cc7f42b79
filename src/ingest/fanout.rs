//! The fan-out thread: creates the deliveries of committed events.
//!
//! Committed events that some webhook subscribes to enter from the group committer
//! ([`super::commit`]) over a bounded channel; for each matching webhook in the registry a
//! delivery record is created and its first attempt handed to the scheduler. The records are
//! written by the delivery writer ([`crate::delivery`]), which holds them for a short
//! window so that most are written once, settled; this thread waits only until their first
//! attempts are scheduled (which paces it to the writer), not for the write. The
//! sequence numbers of events whose deliveries are all written leave through `fanned` (put
//! there by the writer), for the committer to clear their inbox marks after its next flush.
//! Start-up recovery runs the same [`Fanout`], writing at once and waiting.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam::channel::Receiver;

use super::MAX_BATCH;
use crate::clock;
use crate::delivery::{self, Deliveries, DeliveryError, FirstAttempt};
use crate::ids::DeliveryId;
use crate::model::{DeliveryRecord, EventRecord};
use crate::registry::Registry;

/// Deliveries fan-out builds and writes at a time: bounds its memory and the size of one store
/// batch when an event goes to thousands of webhooks.
const FANOUT_CHUNK: usize = 4096;

/// The fan-out thread: creates the deliveries of committed events, off the committer's path,
/// and reports which events are done.
pub(super) fn fanout_loop(rx: Receiver<Vec<EventRecord>>, fanout: Fanout) {
    while let Ok(mut events) = rx.recv() {
        let mut batches = 1;
        while events.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => {
                    events.extend(more);
                    batches += 1;
                }
                Err(_) => break,
            }
        }
        let result = fanout.run(&events, Recovery::No);
        // Scheduled (or owed at the next start): no longer this engine's fan-out lag.
        fanout.lag.fanout_written(batches);
        if let Err(err) = result {
            // The inbox entries stay: fan-out is re-run at the next start.
            tracing::error!(error = %err, "fan-out failed; it will be retried at start-up")
        }
    }
    // Shutdown: what the writer still holds is written now, so that the committer's last
    // flush clears these events' inbox marks.
    if let Err(err) = fanout.deliveries.write_held_blocking() {
        tracing::error!(error = %err, "writing held deliveries at shutdown failed; fan-out re-runs at start-up");
    }
}

/// One fan-out run's chunks in the writer's hands: the last one written reports the run's
/// events as fanned out, unless a write failed.
struct Pending {
    /// Chunks not yet written, plus one for the run itself until it has handed over its last.
    chunks: AtomicUsize,
    failed: AtomicBool,
    seqs: Mutex<Vec<u64>>,
    fanned: Arc<Mutex<Vec<u64>>>,
}

impl Pending {
    fn chunk_done(&self, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::SeqCst);
        }
        if self.chunks.fetch_sub(1, Ordering::SeqCst) == 1 && !self.failed.load(Ordering::SeqCst) {
            let seqs = std::mem::take(&mut *self.seqs.lock().unwrap_or_else(|p| p.into_inner()));
            self.fanned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(seqs);
        }
    }
}

/// Whether fan-out re-runs for events whose deliveries may partly exist already.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Recovery {
    Yes,
    No,
}

/// Creates the deliveries of acknowledged events and schedules their first attempts.
pub(super) struct Fanout {
    pub(super) registry: Arc<Registry>,
    /// The delivery writer, which writes the records with their schedule entries.
    pub(super) deliveries: Deliveries,
    /// The delivery lag's fan-out queue ([`crate::pushback`]): the committer adds each batch
    /// it queues, this thread takes off each one it has handed to the writer.
    pub(super) lag: Arc<crate::pushback::Lag>,
    /// Events whose deliveries are all written, for the committer to clear their inbox marks.
    pub(super) fanned: Arc<Mutex<Vec<u64>>>,
}

impl Fanout {
    /// Creates the deliveries of `events` in chunks of [`FANOUT_CHUNK`], each handed to the
    /// writer as soon as it is full, so memory stays bounded however many webhooks an event
    /// goes to. Delivery ids are derived from (event, webhook), so a fan-out cut short by an
    /// error is completed by re-running it.
    ///
    /// At run time the writer holds the chunks (see `crate::delivery`) and the events are
    /// reported in `fanned` once every chunk is written; in recovery each chunk is written
    /// before the next is built (the caller clears the inbox marks itself).
    pub(super) fn run(
        &self,
        events: &[EventRecord],
        recovery: Recovery,
    ) -> Result<(), DeliveryError> {
        let now = clock::now_ms();
        // This run's own share of the count: the events are reported only after the last
        // chunk is handed over *and* every chunk is written.
        let pending = Arc::new(Pending {
            chunks: AtomicUsize::new(1),
            failed: AtomicBool::new(false),
            seqs: Mutex::new(events.iter().map(|e| e.seq).collect()),
            fanned: self.fanned.clone(),
        });
        let mut records = Vec::new();
        for e in events {
            for hook in self.registry.matching(&e.account_id, &e.event) {
                let id = DeliveryId {
                    seq: e.seq,
                    webhook: hook.hook.id,
                };
                let due = match recovery {
                    // Owed since its event was committed: the dispatcher's lag (and the
                    // push-back, `crate::pushback`) then counts from the 202, not from here.
                    Recovery::No => crate::ids::seq_time_ms(e.seq).min(now),
                    Recovery::Yes => now,
                };
                records.push(delivery::created(id, e, now, FirstAttempt::Due(due)));
                if records.len() >= FANOUT_CHUNK {
                    self.hand_over(std::mem::take(&mut records), recovery, &pending)?;
                }
            }
        }
        if !records.is_empty() {
            self.hand_over(records, recovery, &pending)?;
        }
        if recovery == Recovery::No {
            pending.chunk_done(true);
        }
        Ok(())
    }

    /// Hands one chunk of deliveries to the delivery writer, which schedules their first
    /// attempts and counts them in the account's backlog: at run time held (the chunk's
    /// `pending` share is given back once it is written), in recovery written at once,
    /// keeping those that exist already.
    fn hand_over(
        &self,
        records: Vec<DeliveryRecord>,
        recovery: Recovery,
        pending: &Arc<Pending>,
    ) -> Result<(), DeliveryError> {
        match recovery {
            Recovery::Yes => {
                self.deliveries.create_blocking(records, true)?;
            }
            Recovery::No => {
                pending.chunks.fetch_add(1, Ordering::SeqCst);
                let pending = pending.clone();
                self.deliveries
                    .create_held(records, Box::new(move |r| pending.chunk_done(r.is_ok())))?;
            }
        }
        Ok(())
    }
}
