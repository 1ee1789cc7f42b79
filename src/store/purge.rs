//! Retention's purge of the delivery log: planning each batch of finished deliveries past the
//! cutoff (read-only, on the retention thread), applying a plan after re-checking every
//! record (on the delivery writer, [`crate::delivery`]), and dropping the log's events that
//! nothing needs any more. Plans enter from `crate::retention`; what was removed leaves as
//! [`Purged`] / [`PurgedBatch`] counts.

use sled::IVec;

use super::tracked::Batch;
use super::{keys, Result, Store, StoreError};
use crate::codec;
use crate::ids::{self, DeliveryId};
use crate::model::DeliveryRecord;

impl Store {
    /// Deletes every finished delivery created and last changed before `cutoff_ms` (with its
    /// attempts, index and schedule entries), then every event before it that no delivery and
    /// no owed fan-out needs, applying each batch's plan itself. Only where no delivery writer
    /// runs (unit tests, offline tools): the engine's retention sends each plan to the writer
    /// instead ([`Store::purge_before_with`]), so that a concurrent retry cannot be undone.
    pub fn purge_before(&self, cutoff_ms: u64, go_on: &dyn Fn() -> bool) -> Result<Purged> {
        self.purge_before_with(
            cutoff_ms,
            go_on,
            |plan| Ok(self.apply_purge(&plan)),
            |done| done,
        )
    }

    /// One retention pass. Plans the deletion of finished deliveries in batches of
    /// [`PURGE_BATCH`] (a read-only scan, on the caller's thread) and hands each plan to
    /// `send`, which the engine routes to the delivery writer ([`Store::apply_purge`]
    /// re-checks every record there), and what `send` returned to `wait` for the outcome. The
    /// next batch is planned while the last one is applied, and sent only once it is done, so
    /// the writer never has more than one batch of a pass to apply at a time. Then drops the
    /// log's events before the cutoff that nothing needs any more, [`PURGE_CHUNKS`] chunks per
    /// batch. There is no per-pass budget, so one pass keeps up with any rate the engine can
    /// write at; `go_on` is asked before each batch (shutdown). Blocking: run it on its own
    /// thread.
    pub fn purge_before_with<E: From<StoreError>, P>(
        &self,
        cutoff_ms: u64,
        go_on: &dyn Fn() -> bool,
        mut send: impl FnMut(PurgePlan) -> std::result::Result<P, E>,
        mut wait: impl FnMut(P) -> std::result::Result<PurgedBatch, E>,
    ) -> std::result::Result<Purged, E> {
        let end = keys::seq(ids::seq_floor(cutoff_ms));
        let mut purged = Purged::default();
        let mut add = |batch: PurgedBatch| {
            purged.deliveries += batch.deliveries;
            purged.attempts += batch.attempts;
        };
        let mut after: Option<IVec> = None;
        let mut pending: Option<P> = None;
        while go_on() {
            let plan = self.plan_purge(after.take(), &end, cutoff_ms)?;
            let last = plan.last.clone();
            if let Some(p) = pending.take() {
                add(wait(p)?);
            }
            if !plan.candidates.is_empty() {
                pending = Some(send(plan)?);
            }
            match last {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        if let Some(p) = pending.take() {
            add(wait(p)?);
        }
        // Chunks keyed below the cutoff hold only events older than it; an event goes once no
        // delivery and no owed fan-out needs it. (No delivery of such an event is created any
        // more, except by the fan-out an inbox mark owes, checked first.)
        let mut after: Option<IVec> = None;
        while go_on() {
            let (events, last) =
                self.drop_events(after.take(), Some(end), Some(PURGE_CHUNKS), |e| {
                    if self.inbox.contains_key(keys::seq(e.seq))? {
                        return Ok(false);
                    }
                    let (lo, hi) = keys::deliveries_of_event(e.seq);
                    Ok(self.deliveries.range(lo..=hi).next().is_none())
                })?;
            purged.events += events;
            match last {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        if go_on() {
            // Statistics follow the history they summarise.
            self.purge_stats_before(cutoff_ms)?;
        }
        Ok(purged)
    }

    /// Plans one batch of a purge: looks at up to [`PURGE_BATCH`] deliveries keyed after
    /// `after` and before `end`, and lists those finished and last changed before `cutoff_ms`
    /// with everything that goes with them (their attempts found by one range scan of the
    /// batch's key range — a seek per delivery cost more than the rest of the purge together).
    /// Reads only: nothing changes until [`Store::apply_purge`].
    pub fn plan_purge(
        &self,
        after: Option<IVec>,
        end: &[u8; 8],
        cutoff_ms: u64,
    ) -> Result<PurgePlan> {
        use std::ops::Bound;
        let lo = after.map_or(Bound::Unbounded, Bound::Excluded);
        let hi = Bound::Excluded(IVec::from(&end[..]));
        let mut plan = PurgePlan::default();
        let mut index: std::collections::HashMap<DeliveryId, usize> = Default::default();
        for (seen, kv) in self.deliveries.range::<IVec, _>((lo, hi)).enumerate() {
            if seen >= PURGE_BATCH {
                break;
            }
            let (key, value) = kv?;
            plan.last = Some(key.clone());
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
                value,
                attempts: Vec::new(),
            });
        }
        if let (Some(first), Some(last_id)) = (
            plan.candidates.first().map(|c| c.id),
            plan.last.as_deref().and_then(DeliveryId::from_bytes),
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
                    plan.candidates[i].attempts.push(k);
                }
            }
        }
        Ok(plan)
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
            if self.deliveries.get(key)?.as_ref() != Some(&c.value) {
                done.kept += 1;
                continue;
            }
            if let Some(due) = c.due {
                sc.remove(&keys::schedule(due, c.id));
            }
            bw.remove(&keys::by_webhook(c.id.webhook, c.id));
            for k in &c.attempts {
                at.remove(k.clone());
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

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub deliveries: usize,
    pub attempts: usize,
    pub events: usize,
}

/// What [`Store::apply_purge`] did with one plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgedBatch {
    pub deliveries: usize,
    pub attempts: usize,
    /// Planned deliveries that had changed since (reopened by a retry, deleted) and were kept.
    pub kept: usize,
}

/// One batch of deliveries a retention pass means to delete, read on the retention thread and
/// applied (after a re-check) by the delivery writer: see [`Store::apply_purge`].
#[derive(Debug, Default)]
pub struct PurgePlan {
    candidates: Vec<PurgeCandidate>,
    /// The last delivery key looked at: where the next batch starts (`None`: the range is done).
    last: Option<IVec>,
}

impl PurgePlan {
    /// How many deliveries the plan would delete.
    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }
}

#[derive(Debug)]
struct PurgeCandidate {
    id: DeliveryId,
    due: Option<u64>,
    /// The record as the plan read it: deleted only if still stored exactly so.
    value: IVec,
    attempts: Vec<IVec>,
}

/// Deliveries one purge batch looks at: big enough to amortise a pass over the trees, small
/// enough that applying it holds the delivery writer only briefly (and that the
/// retention thread yields to shutdown often).
pub const PURGE_BATCH: usize = 1024;
/// Event-log chunks one purge batch looks at (up to 64 events each).
pub const PURGE_CHUNKS: usize = 256;
