//! The fan-out thread: creates the deliveries of committed events.
//!
//! Committed events that some webhook subscribes to enter from the group committer
//! ([`super::commit`]) over a bounded channel; for each matching webhook in the registry a
//! delivery record is created and its first attempt handed to the scheduler. The records are
//! written by the delivery writer ([`crate::delivery`]), which holds them unwritten for a short
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
use crate::delivery::{Deliveries, DeliveryError};
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
    /// Creates the deliveries of `events` in chunks of [`FANOUT_CHUNK`], so memory stays
    /// bounded however many webhooks an event goes to. Delivery ids are derived from (event,
    /// webhook), so a fan-out cut short by an error is completed by re-running it.
    ///
    /// At run time the chunks are handed to the writer without waiting, and the events are
    /// reported in `fanned` once every chunk is written; in recovery each chunk is written
    /// before the next is built (the caller clears the inbox marks itself).
    pub(super) fn run(
        &self,
        events: &[EventRecord],
        recovery: Recovery,
    ) -> Result<(), DeliveryError> {
        let now = clock::now_ms();
        let mut chunks = Vec::new();
        let mut records = Vec::new();
        for e in events {
            for hook in self.registry.matching(&e.account_id, &e.event) {
                let id = DeliveryId {
                    seq: e.seq,
                    webhook: hook.hook.id,
                };
                let mut record = DeliveryRecord::new(id, e, now, false);
                if recovery == Recovery::No {
                    // Owed since its event was committed: the dispatcher's lag (and the
                    // push-back, `crate::pushback`) then counts from the 202, not from here.
                    record.next_attempt_ms = Some(crate::ids::seq_time_ms(e.seq).min(now));
                }
                records.push(record);
                if records.len() >= FANOUT_CHUNK {
                    let chunk = std::mem::take(&mut records);
                    match recovery {
                        Recovery::Yes => self.write(chunk)?,
                        Recovery::No => chunks.push(chunk),
                    }
                }
            }
        }
        match recovery {
            Recovery::Yes => self.write(records),
            Recovery::No => {
                if !records.is_empty() {
                    chunks.push(records);
                }
                self.hand_over(chunks, events)
            }
        }
    }

    /// Writes one chunk of deliveries in recovery (through the delivery writer, which also
    /// schedules their first attempts), keeping those that exist already.
    fn write(&self, records: Vec<DeliveryRecord>) -> Result<(), DeliveryError> {
        if records.is_empty() {
            return Ok(());
        }
        self.deliveries.create_blocking(records, true)?;
        Ok(())
    }

    /// Hands a run's chunks to the writer; the last one written reports `events` fanned out.
    fn hand_over(
        &self,
        chunks: Vec<Vec<DeliveryRecord>>,
        events: &[EventRecord],
    ) -> Result<(), DeliveryError> {
        let seqs = events.iter().map(|e| e.seq).collect();
        if chunks.is_empty() {
            // No webhook matched (any more): nothing to write, nothing owed.
            self.fanned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(seqs);
            return Ok(());
        }
        let pending = Arc::new(Pending {
            chunks: AtomicUsize::new(chunks.len()),
            failed: AtomicBool::new(false),
            seqs: Mutex::new(seqs),
            fanned: self.fanned.clone(),
        });
        for chunk in chunks {
            let pending = pending.clone();
            self.deliveries
                .create_held(chunk, Box::new(move |r| pending.chunk_done(r.is_ok())))?;
        }
        Ok(())
    }
}
