//! How the embedded store writes one drain of the delivery writer ([`DeliveryWrites`]): tree
//! by tree, in the order that keeps the recovery invariant true at every crash point.

use super::tracked::Batch;
use super::{keys, Result, SledStore};
use crate::codec;
use crate::ids::AccountId;
use crate::store::DeliveryWrites;

impl SledStore {
    /// Applies one drain of the delivery writer. New schedule entries go first and superseded
    /// ones last, so that after a crash at any point every record's `next_attempt_ms` has its
    /// entry (an entry without a matching record is dropped when it fires); records go before
    /// their index entries, which a re-run fan-out writes again.
    pub fn apply_delivery_writes(&self, w: &DeliveryWrites) -> Result<()> {
        let mut sc = Batch::default();
        for (due, id) in &w.schedule_insert {
            sc.insert(&keys::schedule(*due, *id), &[]);
        }
        self.schedule.write_in_order(sc)?;
        let mut at = Batch::default();
        for (id, a) in &w.attempts {
            at.insert(&keys::attempt(*id, a.number), codec::encode(a));
            // Only the first and the latest attempts are kept (`crate::history`).
            if let Some(dropped) = crate::history::dropped_by(a.number) {
                let range = keys::attempt(*id, dropped.start)..keys::attempt(*id, dropped.end);
                for k in self.attempts.range(range).keys() {
                    at.remove(k?);
                }
            }
        }
        self.attempts.write_in_order(at)?;
        let mut dl = Batch::default();
        for r in &w.deliveries {
            dl.insert(&keys::delivery(r.id), codec::encode(r));
        }
        self.deliveries.write_in_order(dl)?;
        let mut bw = Batch::default();
        let mut ba = Batch::default();
        let mut events: Vec<(&AccountId, u64)> = Vec::with_capacity(w.indexed.len());
        for (account, id) in &w.indexed {
            bw.insert(&keys::by_webhook(id.webhook, *id), &[]);
            events.push((account, id.seq));
        }
        // One entry per event, however many of its deliveries the drain writes.
        events.sort_unstable();
        events.dedup();
        for (account, seq) in events {
            ba.insert(keys::by_account(account, seq), &[]);
        }
        self.by_webhook.write_in_order(bw)?;
        self.by_account.write_in_order(ba)?;
        let mut sc = Batch::default();
        for (due, id) in &w.schedule_remove {
            sc.remove(&keys::schedule(*due, *id));
        }
        self.schedule.write_in_order(sc)?;
        self.add_stats(&w.stats)?;
        Ok(())
    }
}
