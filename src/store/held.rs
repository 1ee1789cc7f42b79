//! Held deliveries: those the delivery writer has created but not written yet.
//!
//! Most deliveries are attempted, and answered, within milliseconds of being created. Writing
//! each one as `pending` with a schedule entry and then again as `delivered` with the entry
//! removed cost the single delivery writer seven tree writes per delivery, and under fan-out
//! that writer was the engine's bound. So a delivery fan-out creates is held here, in memory,
//! for up to a short window (`delivery::HELD_WINDOW`; the windows themselves are the writer's,
//! `delivery/held.rs`): if its first attempt settles within it, the record is written once, in
//! its settled state, with no schedule entry ever written; if not, it is written as created
//! when the window ends. Nothing is lost by the wait: the event's inbox mark stands until
//! every one of its deliveries is written, and a crash re-runs its fan-out at start-up, as it
//! does for an event whose deliveries never reached the writer.
//!
//! Only the delivery writer inserts and removes; every reader of a delivery record goes
//! through [`super::Storage::get_delivery`] (every backend keeps one), which looks here first, so a held delivery is
//! admitted, retried by hand or shown by id like a written one, and the delivery log's
//! listings merge held ones in ([`HeldDeliveries::matching`]). The writer replaces a held
//! record with its new state *before* writing that state and removes it only *after*, so a
//! reader never sees an older state than the one on disk. The whole-webhook scans
//! (`list_deliveries`, `webhook_deliveries`: a 410's disable, a switch to fifo, a recover)
//! merge held records in by id. A fifo webhook's deliveries are not held (its order is kept
//! from written records).
//!
//! **Why, in figures.** With push-back in place the delivery writer still bounded the rate: a
//! delivery that succeeds at once cost it 7 tree writes — created (record, two log indexes,
//! schedule entry), then settled (attempt, record again, schedule entry removed) — about 4 µs
//! each, sled copying nodes and splitting the rightmost leaf of each sequential tree. Held,
//! it costs 4 (record, attempt, the indexes), and no schedule entry is written or removed.
//! What is still held when its window ends (a slow or hanging endpoint, a backlog) is written
//! as created, at most ~4 096 per turn of the writer's loop so that the outcomes queued behind
//! are not held up, and the oldest beyond 65 536 held are written early (`delivery/held.rs`).
//! Fan-out waits for the first attempts to be scheduled, not for a write, which paces it to
//! the writer as the write did. At shutdown fan-out has the writer write everything held
//! before the committer's last flush. Counted by
//! `kyberhook_held_deliveries_written_total{state="settled"|"pending"}`; a crash while
//! deliveries are held is tested by `tests/it/crash.rs`
//! (`sigkill_while_new_deliveries_are_held_loses_nothing`).
//!
//! Full load-bench runs at 10 webhooks × 64 connections with push-back: deliveries during
//! ingest 18.3 k → 23.3 k/s (held) → 25.6 k/s (with store format 3's per-event account index,
//! which cuts a creation to its record, attempt and `by_webhook` entry plus a tenth of an
//! account entry), against 28–29 k/s once ingest stops; 202 → arrival p99 542 → 407 → 291 ms;
//! the writer's CPU per delivery 29 → ~20 → ~17–20 µs.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::ids::DeliveryId;
use crate::model::DeliveryRecord;

/// Independent locks, so the dispatcher's reads and the writer's updates rarely meet.
const SHARDS: usize = 16;

/// The held records, sharded by delivery id.
pub(crate) struct HeldDeliveries {
    shards: Vec<Mutex<HashMap<DeliveryId, DeliveryRecord>>>,
}

impl Default for HeldDeliveries {
    fn default() -> Self {
        HeldDeliveries {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl HeldDeliveries {
    fn shard(
        &self,
        id: DeliveryId,
    ) -> std::sync::MutexGuard<'_, HashMap<DeliveryId, DeliveryRecord>> {
        // Sequence numbers are time-ordered and webhook ids small: mixing both spreads
        // the deliveries of one event and of one webhook over the shards.
        let i = (id.seq ^ id.webhook.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self, id: DeliveryId) -> Option<DeliveryRecord> {
        self.shard(id).get(&id).cloned()
    }

    pub(crate) fn contains(&self, id: DeliveryId) -> bool {
        self.shard(id).contains_key(&id)
    }

    /// Holds `record` (new, or the new state of one already held).
    pub(crate) fn put(&self, record: DeliveryRecord) {
        self.shard(record.id).insert(record.id, record);
    }

    /// Stops holding `id` (its record is now on the store, or it was dropped). Returns it.
    pub(crate) fn take(&self, id: DeliveryId) -> Option<DeliveryRecord> {
        self.shard(id).remove(&id)
    }

    /// The held records `keep` selects, in id order (creation order, as the index trees).
    /// A scan of everything held — bounded by the writer's cap — for the delivery log's
    /// listings and whole-webhook transitions, not for hot paths.
    pub(crate) fn matching(&self, keep: impl Fn(&DeliveryRecord) -> bool) -> Vec<DeliveryRecord> {
        let mut out: Vec<DeliveryRecord> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(shard.values().filter(|r| keep(r)).cloned());
        }
        out.sort_unstable_by_key(|r| r.id.to_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, EventId, WebhookId};
    use crate::model::{DeliveryStatus, EventRecord};

    fn record(seq: u64, webhook: u64) -> DeliveryRecord {
        let event = EventRecord {
            seq,
            id: EventId::from_seq(seq),
            account_id: AccountId::parse("acc_1").unwrap(),
            event: "visitor.checked_in".into(),
            body: b"{}".to_vec(),
        };
        let id = DeliveryId {
            seq,
            webhook: WebhookId(webhook),
        };
        DeliveryRecord::new(id, &event, 1, false)
    }

    #[test]
    fn a_held_record_is_read_back_in_its_latest_state_until_taken() {
        let held = HeldDeliveries::default();
        let mut r = record(7, 3);
        assert!(held.get(r.id).is_none());
        held.put(r.clone());
        assert!(held.contains(r.id));
        r.status = DeliveryStatus::Delivered;
        held.put(r.clone());
        assert_eq!(held.get(r.id).unwrap().status, DeliveryStatus::Delivered);
        // Another delivery of the same event is another entry.
        assert!(held.get(record(7, 4).id).is_none());
        let other = record(9, 3);
        held.put(other.clone());
        held.put(record(8, 1));
        let of_hook_3: Vec<_> = held
            .matching(|r| r.id.webhook == WebhookId(3))
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(of_hook_3, vec![r.id, other.id], "in id order, filtered");
        assert_eq!(held.take(r.id).unwrap().status, DeliveryStatus::Delivered);
        assert!(held.get(r.id).is_none());
        assert!(held.take(r.id).is_none());
    }
}
