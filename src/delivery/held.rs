//! The held windows: which batches of held deliveries (one fan-out `create_held` each) the
//! delivery writer is waiting on, when each window ends, and when a batch is answered.
//!
//! A held delivery is one fan-out created and the writer has not written yet; its record lives
//! in the store's overlay (`store/embedded/held.rs`, which also says why deliveries are held),
//! which every reader consults. This file keeps only the writer's side of it: batches enter
//! with [`HeldBatches::add`] once their first attempts are scheduled; a delivery leaves its
//! batch when the writer writes it ([`HeldBatches::written`]: its attempt settled, or its
//! window ended and [`HeldBatches::due`] picked it); the batch's answer (fan-out's "written",
//! which clears its events' inbox marks) is handed back once its last delivery is written. Pure
//! bookkeeping: no store, no clock of its own.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::writer::Answer;
use super::DeliveryError;
use crate::ids::DeliveryId;

/// How long a delivery fan-out created is held, waiting for its first attempt to settle.
/// Long enough for an attempt that queued behind busy slots under load (the load bench's
/// 10-webhook phases see p99 of ~0.5 s from commit to arrival), short enough that the
/// delivery log shows a slow attempt's delivery as pending soon after its event.
pub const HELD_WINDOW: Duration = Duration::from_secs(1);
/// Most deliveries held at once; beyond it the oldest are written early (bounds memory when
/// attempts stop settling, e.g. every endpoint hangs).
pub(super) const HELD_MAX: usize = 65_536;

/// A batch of held deliveries (one `create_held`), answered once every one of them is
/// written: as its attempts settle, or when its window ends.
struct HeldBatch {
    /// When the batch's window ends: whatever of it is still held is written then.
    until: Instant,
    ids: Vec<DeliveryId>,
    /// How many of `ids` are still held.
    still_held: usize,
    /// Taken when the batch is answered.
    answer: Option<Answer>,
}

/// The writer's held batches, oldest first (windows end in that order), and which batch each
/// held delivery belongs to.
#[derive(Default)]
pub(super) struct HeldBatches {
    batches: VecDeque<HeldBatch>,
    /// The number of `batches[0]`; batches are numbered in creation order.
    first: u64,
    /// Held delivery → its batch's number.
    of: HashMap<DeliveryId, u64>,
}

impl HeldBatches {
    /// A new batch whose window ends at `until`.
    pub(super) fn add(&mut self, until: Instant, ids: Vec<DeliveryId>, answer: Answer) {
        let no = self.first + self.batches.len() as u64;
        for id in &ids {
            self.of.insert(*id, no);
        }
        self.batches.push_back(HeldBatch {
            until,
            still_held: ids.len(),
            ids,
            answer: Some(answer),
        });
    }

    /// `id` was written: returns its batch's answer if that was the batch's last one held.
    pub(super) fn written(&mut self, id: DeliveryId) -> Option<Answer> {
        let no = self.of.remove(&id)?;
        let batch = self.batches.get_mut((no - self.first) as usize)?;
        batch.still_held -= 1;
        if batch.still_held == 0 {
            batch.answer.take()
        } else {
            None
        }
    }

    /// When the next held batch's window ends (now, if more are held than [`HELD_MAX`]).
    pub(super) fn next_due(&self) -> Option<Instant> {
        let oldest = self.batches.front()?;
        Some(if self.of.len() > HELD_MAX {
            Instant::now()
        } else {
            oldest.until
        })
    }

    /// The still-held deliveries of the batches whose window ended by `now` (and of the oldest
    /// beyond [`HELD_MAX`]), whole batches, until at least `limit` are picked; with `None`,
    /// of every batch. Also returns the number just past the last batch picked, for
    /// [`HeldBatches::abandon`].
    pub(super) fn due(&mut self, now: Option<Instant>, limit: usize) -> (Vec<DeliveryId>, u64) {
        self.trim();
        let mut ids = Vec::new();
        let mut batches = 0;
        for batch in &self.batches {
            let due = match now {
                None => true,
                Some(now) => {
                    ids.len() < limit
                        && (batch.until <= now || self.of.len() - ids.len() > HELD_MAX)
                }
            };
            if !due {
                break;
            }
            batches += 1;
            ids.extend(batch.ids.iter().filter(|id| self.of.contains_key(id)));
        }
        (ids, self.first + batches as u64)
    }

    /// Stops holding the batches numbered below `end` (from [`HeldBatches::due`]; the writer
    /// may have answered and dropped some meanwhile) after their write failed: `release` is
    /// called for each delivery still held, and each batch not answered yet is answered `err`.
    pub(super) fn abandon(
        &mut self,
        end: u64,
        err: &DeliveryError,
        mut release: impl FnMut(DeliveryId),
    ) {
        let still_due = end.saturating_sub(self.first) as usize;
        for batch in self.batches.iter_mut().take(still_due) {
            for id in &batch.ids {
                if self.of.remove(id).is_some() {
                    release(*id);
                }
            }
            if let Some(answer) = batch.answer.take() {
                answer(Some(err));
            }
        }
        self.trim();
    }

    /// Drops answered batches from the front.
    pub(super) fn trim(&mut self) {
        while self.batches.front().is_some_and(|b| b.answer.is_none()) {
            self.batches.pop_front();
            self.first += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::ids::WebhookId;

    fn id(seq: u64) -> DeliveryId {
        DeliveryId {
            seq,
            webhook: WebhookId(1),
        }
    }

    /// Which batch was answered, and with which error (`None`: written).
    type Log = Arc<Mutex<Vec<(u32, Option<String>)>>>;

    /// An answer that records what it was answered.
    fn answer(log: &Log, batch: u32) -> Answer {
        let log = log.clone();
        Box::new(move |err| {
            log.lock()
                .unwrap()
                .push((batch, err.map(|e| e.to_string())))
        })
    }

    #[test]
    fn a_batch_is_answered_once_its_last_held_delivery_is_written() {
        let log = Arc::default();
        let mut held = HeldBatches::default();
        let t = Instant::now();
        held.add(t, vec![id(1), id(2)], answer(&log, 1));
        held.add(t, vec![id(3)], answer(&log, 2));
        assert!(held.written(id(2)).is_none());
        held.written(id(3)).expect("batch 2's last")(None);
        // Written twice (never expected) or never held: nothing.
        assert!(held.written(id(3)).is_none());
        assert!(held.written(id(9)).is_none());
        held.written(id(1)).expect("batch 1's last")(None);
        assert_eq!(*log.lock().unwrap(), vec![(2, None), (1, None)]);
        held.trim();
        assert_eq!(held.next_due(), None, "both answered and dropped");
    }

    #[test]
    fn windows_come_due_oldest_first_skipping_what_was_written_meanwhile() {
        let log = Arc::default();
        let mut held = HeldBatches::default();
        let t = Instant::now();
        held.add(t, vec![id(1), id(2)], answer(&log, 1));
        held.add(t + HELD_WINDOW, vec![id(3)], answer(&log, 2));
        assert_eq!(held.next_due(), Some(t));
        assert!(held.written(id(1)).is_none());
        assert_eq!(held.due(Some(t), 100), (vec![id(2)], 1));
        assert_eq!(
            held.due(Some(t + HELD_WINDOW), 100),
            (vec![id(2), id(3)], 2)
        );
        // At shutdown everything is due.
        assert_eq!(held.due(None, 0), (vec![id(2), id(3)], 2));
        // A limit ends the pick after the batch that reached it.
        assert_eq!(held.due(Some(t + HELD_WINDOW), 1), (vec![id(2)], 1));
    }

    #[test]
    fn beyond_the_cap_the_oldest_batches_are_due_at_once() {
        let log = Arc::default();
        let mut held = HeldBatches::default();
        let t = Instant::now() + Duration::from_secs(3600);
        held.add(t, (0..HELD_MAX as u64).map(id).collect(), answer(&log, 1));
        held.add(t, vec![id(HELD_MAX as u64)], answer(&log, 2));
        let now = Instant::now();
        assert!(held.next_due().unwrap() <= Instant::now());
        let (ids, end) = held.due(Some(now), usize::MAX);
        assert_eq!((ids.len(), end), (HELD_MAX, 1), "only the oldest batch");
    }

    #[test]
    fn a_failed_write_abandons_only_the_batches_that_were_due() {
        let log = Arc::default();
        let mut held = HeldBatches::default();
        let t = Instant::now();
        held.add(t, vec![id(1), id(2)], answer(&log, 1));
        held.add(t + HELD_WINDOW, vec![id(3)], answer(&log, 2));
        assert!(held.written(id(1)).is_none());
        let (_, end) = held.due(Some(t), 100);
        let mut released = Vec::new();
        held.abandon(end, &DeliveryError::Closed, |id| released.push(id));
        assert_eq!(released, vec![id(2)]);
        assert_eq!(
            *log.lock().unwrap(),
            vec![(1, Some(DeliveryError::Closed.to_string()))]
        );
        // Batch 2 is still held, and is now the oldest.
        assert_eq!(held.next_due(), Some(t + HELD_WINDOW));
        held.written(id(3)).expect("batch 2's last")(None);
    }
}
