//! Retention's purge of the delivery log: planning each batch of finished deliveries past the
//! cutoff (read-only, on the retention thread), applying a plan after re-checking every
//! record (on the delivery writer, [`crate::delivery`]), and dropping the log's events that
//! nothing needs any more. Plans enter from `crate::retention`; what was removed leaves as
//! [`crate::store::Purged`] / [`PurgedBatch`] counts; the pass itself is
//! [`crate::store::purge_before_with`].

use sled::IVec;

use super::tracked::Batch;
use super::{keys, Result, SledStore};
use crate::codec;
use crate::ids::{self, DeliveryId};
use crate::model::DeliveryRecord;
use crate::store::{PurgeCandidate, PurgeCursor, PurgePlan, PurgedBatch};

impl SledStore {
    /// Plans one batch of a purge: looks at up to [`PURGE_BATCH`] deliveries keyed after
    /// `after` and before `end`, and lists those finished and last changed before `cutoff_ms`
    /// with everything that goes with them (their attempts found by one range scan of the
    /// batch's key range — a seek per delivery cost more than the rest of the purge together).
    /// Reads only: nothing changes until [`crate::store::Storage::apply_purge`].
    pub fn plan_purge(&self, cutoff_ms: u64, after: Option<&PurgeCursor>) -> Result<PurgePlan> {
        use std::ops::Bound;
        let end = keys::seq(ids::seq_floor(cutoff_ms));
        let lo = after.map_or(Bound::Unbounded, |c| Bound::Excluded(IVec::from(&c.0[..])));
        let hi = Bound::Excluded(IVec::from(&end[..]));
        let mut plan = PurgePlan::default();
        let mut index: std::collections::HashMap<DeliveryId, usize> = Default::default();
        for (seen, kv) in self.deliveries.range::<IVec, _>((lo, hi)).enumerate() {
            if seen >= PURGE_BATCH {
                break;
            }
            let (key, value) = kv?;
            plan.next = Some(PurgeCursor(key.to_vec()));
            let record: DeliveryRecord = codec::decode(&value)?;
            // Open deliveries stay, however old: they are still owed an attempt. A finished one
            // changed since the cutoff (retried by hand, recovered) keeps its fresh history.
            if record.status.is_open() || record.updated_ms >= cutoff_ms {
                continue;
            }
            index.insert(record.id, plan.candidates.len());
            plan.candidates.push(PurgeCandidate {
                id: record.id,
                due: record.next_attempt_ms,
                value: value.to_vec(),
                attempts: Vec::new(),
            });
        }
        if let (Some(first), Some(last_id)) = (
            plan.candidates.first().map(|c| c.id),
            plan.next
                .as_ref()
                .and_then(|c| DeliveryId::from_bytes(&c.0)),
        ) {
            let from = keys::attempt(first, 0);
            let to = keys::attempt(last_id, u32::MAX);
            for k in self.attempts.range(from..=to).keys() {
                let k = k?;
                if let Some(&i) = k
                    .get(..16)
                    .and_then(DeliveryId::from_bytes)
                    .and_then(|id| index.get(&id))
                {
                    plan.candidates[i].attempts.push(k.to_vec());
                }
            }
        }
        Ok(plan)
    }

    /// Drops up to [`PURGE_CHUNKS`] chunks' worth of events before `cutoff_ms` after `after`
    /// that no delivery and no owed fan-out needs; how many, and where the next batch starts.
    pub fn purge_events(
        &self,
        cutoff_ms: u64,
        after: Option<&PurgeCursor>,
    ) -> Result<(usize, Option<PurgeCursor>)> {
        let end = keys::seq(ids::seq_floor(cutoff_ms));
        let after = after.map(|c| IVec::from(&c.0[..]));
        let (events, last) = self.drop_events(after, Some(end), Some(PURGE_CHUNKS), |e| {
            if self.inbox.contains_key(keys::seq(e.seq))? {
                return Ok(false);
            }
            let (lo, hi) = keys::deliveries_of_event(e.seq);
            Ok(self.deliveries.range(lo..=hi).next().is_none())
        })?;
        Ok((events, last.map(|k| PurgeCursor(k.to_vec()))))
    }

    /// Deletes what `plan` lists, re-checking each delivery first: only one still stored
    /// byte for byte as planned goes. Every change of a delivery rewrites its record (a retry
    /// or recover reopens it and stamps `updated_ms`, an outcome adds to `attempt_count`), so
    /// an unchanged record also means unchanged attempts and entries, and one changed since
    /// the plan (a manual retry that came in meanwhile) is kept with everything it has.
    ///
    /// Call it only on the delivery writer (`crate::delivery`), which alone writes delivery
    /// records: there nothing can change a record between this check and the delete, and a
    /// retry answered before it is already on the store when it runs.
    pub fn apply_purge(&self, plan: &PurgePlan) -> Result<PurgedBatch> {
        // The account index names events, not deliveries: its entry goes with the event.
        let (mut dl, mut at, mut bw, mut sc) = (
            Batch::default(),
            Batch::default(),
            Batch::default(),
            Batch::default(),
        );
        let mut done = PurgedBatch::default();
        for c in &plan.candidates {
            let key = keys::delivery(c.id);
            if self.deliveries.get(key)?.as_deref() != Some(&c.value[..]) {
                done.kept += 1;
                continue;
            }
            if let Some(due) = c.due {
                sc.remove(&keys::schedule(due, c.id));
            }
            bw.remove(&keys::by_webhook(c.id.webhook, c.id));
            for k in &c.attempts {
                at.remove(&k[..]);
            }
            dl.remove(&key);
            done.deliveries += 1;
            done.attempts += c.attempts.len();
        }
        // The record last: a crash in between leaves it to be found (and its remains deleted)
        // by the next pass, never an index entry or attempt nobody can find again.
        self.attempts.write_in_order(at)?;
        self.schedule.write_in_order(sc)?;
        self.by_webhook.write_in_order(bw)?;
        self.deliveries.write_in_order(dl)?;
        Ok(done)
    }
}

/// Deliveries one purge batch looks at: big enough to amortise a pass over the trees, small
/// enough that applying it holds the delivery writer only briefly (and that the
/// retention thread yields to shutdown often).
pub const PURGE_BATCH: usize = 1024;
/// Event-log chunks one purge batch looks at (up to 64 events each).
pub const PURGE_CHUNKS: usize = 256;
