//! The fan-out thread: creates the deliveries of committed events.
//!
//! Committed events that some webhook subscribes to enter from the group committer
//! ([`super::commit`]) over a bounded channel; for each matching webhook in the registry a
//! delivery record is written and its first attempt handed to the scheduler. The records are
//! written by the delivery writer ([`crate::delivery`]). The sequence
//! numbers of events whose deliveries are written leave through `fanned`, for the committer to
//! clear their inbox marks after its next flush. Start-up recovery runs the same [`Fanout`].

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
pub(super) fn fanout_loop(
    rx: Receiver<Vec<EventRecord>>,
    fanout: Fanout,
    fanned: Arc<Mutex<Vec<u64>>>,
) {
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
        // Written (or owed at the next start): no longer this engine's lag.
        fanout.lag.fanout_written(batches);
        match result {
            Ok(()) => fanned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(events.iter().map(|e| e.seq)),
            // The inbox entries stay: fan-out is re-run at the next start.
            Err(err) => {
                tracing::error!(error = %err, "fan-out failed; it will be retried at start-up")
            }
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
    /// it queues, this thread takes off each one it has written.
    pub(super) lag: Arc<crate::pushback::Lag>,
}

impl Fanout {
    /// Writes the deliveries of `events` in chunks of [`FANOUT_CHUNK`], so memory stays
    /// bounded however many webhooks an event goes to. Delivery ids are derived from (event,
    /// webhook), so a fan-out cut short by an error is completed by re-running it.
    pub(super) fn run(
        &self,
        events: &[EventRecord],
        recovery: Recovery,
    ) -> Result<(), DeliveryError> {
        let now = clock::now_ms();
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
                    self.write(std::mem::take(&mut records), recovery)?;
                }
            }
        }
        self.write(records, recovery)
    }

    /// Writes one chunk of deliveries (through the delivery writer, which also schedules
    /// their first attempts and counts them in the account's backlog).
    fn write(&self, records: Vec<DeliveryRecord>, recovery: Recovery) -> Result<(), DeliveryError> {
        if records.is_empty() {
            return Ok(());
        }
        self.deliveries
            .create_blocking(records, recovery == Recovery::Yes)?;
        Ok(())
    }
}
