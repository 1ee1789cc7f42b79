//! The delivery writer's batches: every change one drain of the writer ([`crate::delivery`])
//! makes to the delivery trees, and the crash-safe order it is written in. Built only by the
//! writer (and by tests, benches and tools that fill a store directly); applied by
//! [`super::Storage::apply_delivery_writes`].

use crate::ids::{AccountId, DeliveryId};
use crate::model::{AttemptRecord, DeliveryRecord};
use crate::stats::AttemptStat;

/// Everything one drain of the delivery writer changes, applied by
/// [`super::Storage::apply_delivery_writes`] tree by tree, write by write, in the order that keeps the
/// recovery invariant ("every owed attempt is in `schedule`") true at every crash point.
#[derive(Debug, Default)]
pub struct DeliveryWrites {
    /// Schedule entries that must exist (written first).
    pub schedule_insert: Vec<(u64, DeliveryId)>,
    /// Attempts to store.
    pub attempts: Vec<(DeliveryId, AttemptRecord)>,
    /// Delivery records to store (new or changed).
    pub deliveries: Vec<DeliveryRecord>,
    /// New deliveries whose log index entries are written (`by_webhook` per delivery,
    /// `by_account` per event).
    pub indexed: Vec<(AccountId, DeliveryId)>,
    /// Schedule entries no record points to any more (removed last).
    pub schedule_remove: Vec<(u64, DeliveryId)>,
    /// The drain's attempts for their webhooks' statistics (written after everything else:
    /// not part of what recovery relies on).
    pub stats: Vec<AttemptStat>,
}

impl DeliveryWrites {
    /// These writes without what concerns deliveries of accounts for which `keep` fails (a
    /// node's writes for partitions it no longer holds: their next owner works from what is
    /// stored). An attempt or schedule change goes with its delivery's record when the drain
    /// has it, else with the account the log index names; one of neither stays.
    pub fn retain_accounts(&self, keep: impl Fn(&AccountId) -> bool) -> DeliveryWrites {
        let mut account: std::collections::HashMap<DeliveryId, &AccountId> =
            self.indexed.iter().map(|(a, id)| (*id, a)).collect();
        account.extend(self.deliveries.iter().map(|r| (r.id, &r.account_id)));
        let kept = |id: &DeliveryId| account.get(id).map_or(true, |a| keep(a));
        DeliveryWrites {
            schedule_insert: self
                .schedule_insert
                .iter()
                .filter(|(_, id)| kept(id))
                .copied()
                .collect(),
            attempts: self
                .attempts
                .iter()
                .filter(|(id, _)| kept(id))
                .cloned()
                .collect(),
            deliveries: self
                .deliveries
                .iter()
                .filter(|r| keep(&r.account_id))
                .cloned()
                .collect(),
            indexed: self
                .indexed
                .iter()
                .filter(|(a, _)| keep(a))
                .cloned()
                .collect(),
            schedule_remove: self
                .schedule_remove
                .iter()
                .filter(|(_, id)| kept(id))
                .copied()
                .collect(),
            stats: self.stats.clone(),
        }
    }

    /// New deliveries with their log index and schedule entries, as the delivery writer
    /// writes a create (for tests, benches and tools that fill a store directly).
    pub fn created(records: Vec<DeliveryRecord>) -> Self {
        DeliveryWrites {
            schedule_insert: records
                .iter()
                .filter_map(|r| Some((r.next_attempt_ms?, r.id)))
                .collect(),
            indexed: records
                .iter()
                .map(|r| (r.account_id.clone(), r.id))
                .collect(),
            deliveries: records,
            ..Default::default()
        }
    }

    /// One attempt and the delivery's new state, its schedule entry moved from `old_due`
    /// to the record's `next_attempt_ms`, as the delivery writer writes an outcome.
    pub fn settled(record: DeliveryRecord, old_due: Option<u64>, attempt: AttemptRecord) -> Self {
        let moved = old_due != record.next_attempt_ms;
        DeliveryWrites {
            schedule_insert: record
                .next_attempt_ms
                .filter(|_| moved)
                .map(|due| (due, record.id))
                .into_iter()
                .collect(),
            schedule_remove: old_due
                .filter(|_| moved)
                .map(|due| (due, record.id))
                .into_iter()
                .collect(),
            attempts: vec![(record.id, attempt)],
            deliveries: vec![record],
            ..Default::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.schedule_insert.is_empty()
            && self.attempts.is_empty()
            && self.deliveries.is_empty()
            && self.indexed.is_empty()
            && self.schedule_remove.is_empty()
            && self.stats.is_empty()
    }
}
