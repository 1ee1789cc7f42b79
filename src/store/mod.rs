//! The storage boundary: everything the engine keeps on disk goes through the [`Storage`]
//! trait, and every storage failure comes back as one cloneable [`StoreError`] whose
//! [`StoreErrorKind`] decides the answer (503 `storage_unavailable` for a disk that refuses
//! writes, on every path).
//!
//! The engine holds an `Arc<dyn Storage>`. Records go in typed (accounts, webhooks, event
//! batches, the delivery writer's [`DeliveryWrites`], retention's [`PurgePlan`]) and come back
//! typed; how they are laid out is the backend's business. Today's backend is the embedded
//! store ([`embedded`], on sled), opened by [`embedded::SledStore::open_with`]. Nothing
//! outside this folder names the storage library.
//!
//! Two rules every backend keeps, because the engine's recovery relies on them:
//! - **Durability is explicit.** A write is power-safe only after [`Storage::make_durable`]
//!   returns, which the ingest group committer calls once per batch before it answers 202.
//! - **Crash order.** [`Storage::apply_delivery_writes`] leaves "every owed attempt has a
//!   schedule entry" true at every crash point (see [`DeliveryWrites`]).

#[doc(hidden)]
pub mod conformance;
pub mod embedded;
pub(crate) mod held;
pub mod postgres;
mod writes;

pub use writes::DeliveryWrites;

use std::sync::Arc;

use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{Account, AttemptRecord, DeliveryRecord, DeliveryStatus, EventRecord, Webhook};
use crate::partition::{partition_of, Partition};
use crate::stats::{AttemptStat, Counts};

/// What kind of failure a [`StoreError`] is: the only thing callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The disk refuses writes (full, over quota, failing), or refused one earlier and the
    /// store will not write again: answered 503 `storage_unavailable`; at start-up the engine
    /// exits for its supervisor to retry.
    Unavailable,
    /// Any other I/O error of the storage (a path that cannot be opened, a read that fails):
    /// 503 while serving; at start-up, the operator's to fix.
    Io,
    /// Something the operator must fix before the store opens: the secrets key, permissions,
    /// a store written by a newer kyberhook, a damaged version record.
    Operator,
    /// A record that does not decode, or a failure of the storage itself.
    Internal,
    /// A write refused before it reached the database because it touches accounts whose
    /// partition this node does not hold (handed over, or never its own): not a failure of
    /// the store; the request is another node's to serve (503 `not_here`, retry in a second).
    Moved,
}

/// A storage failure. Cloneable, so one failure of a group commit or a writer drain can be
/// handed to every caller waiting on it with its kind intact.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: Arc<str>,
}

impl StoreError {
    pub fn new(kind: StoreErrorKind, message: impl Into<Arc<str>>) -> StoreError {
        StoreError {
            kind,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// Whether the disk refuses writes (see [`StoreErrorKind::Unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }

    /// Whether the storage cannot be written or read right now, the caller may retry: both
    /// I/O kinds, answered 503 `storage_unavailable` by every request path.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, StoreErrorKind::Unavailable | StoreErrorKind::Io)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The nodes sharing a store, as `GET /v1/admin/cluster` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// `sled` or `postgres`.
    pub backend: &'static str,
    /// How many partitions accounts are hashed into.
    pub partitions: u32,
    pub nodes: Vec<NodeView>,
}

/// One node of a [`ClusterView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub advertise: Option<String>,
    /// Partitions it holds.
    pub partitions: u32,
    /// Its last heartbeat (unix ms).
    pub last_seen_ms: u64,
    /// Whether it holds the lease to serve.
    pub serving: bool,
}

/// A page of deliveries and the cursor of the next page.
pub struct DeliveryPage {
    pub items: Vec<DeliveryRecord>,
    pub next_cursor: Option<DeliveryId>,
}

/// Filters of the delivery-log queries.
#[derive(Debug, Clone, Default)]
pub struct DeliveryQuery {
    pub webhook: Option<WebhookId>,
    pub status: Option<DeliveryStatus>,
    pub event: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// Only the deliveries of the event with this sequence number.
    pub event_seq: Option<u64>,
    /// Exclusive upper bound: the last id of the previous page.
    pub cursor: Option<DeliveryId>,
    pub limit: usize,
}

/// Where the next batch of a retention scan starts (opaque to all but the backend that made
/// it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeCursor(pub(crate) Vec<u8>);

/// One batch of deliveries a retention pass means to delete, planned by a read-only scan on
/// the retention thread and applied, after a re-check, by the delivery writer: see
/// [`Storage::apply_purge`].
#[derive(Debug, Default)]
pub struct PurgePlan {
    pub(crate) candidates: Vec<PurgeCandidate>,
    /// Where the next batch starts (`None`: the range is done).
    pub(crate) next: Option<PurgeCursor>,
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

/// One delivery of a [`PurgePlan`].
#[derive(Debug)]
pub(crate) struct PurgeCandidate {
    pub(crate) id: DeliveryId,
    pub(crate) due: Option<u64>,
    /// The record as the plan read it: deleted only if still stored exactly so.
    pub(crate) value: Vec<u8>,
    /// The backend's keys of its attempts.
    pub(crate) attempts: Vec<Vec<u8>>,
}

/// What one retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub deliveries: usize,
    pub attempts: usize,
    pub events: usize,
}

/// What [`Storage::apply_purge`] did with one plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgedBatch {
    pub deliveries: usize,
    pub attempts: usize,
    /// Planned deliveries that had changed since (reopened by a retry, deleted) and were kept.
    pub kept: usize,
}

/// An online backup in progress: [`Storage::begin_backup`] starts it, `write_to` streams it.
/// Dropping it unfinished stops it and costs the writers nothing afterwards.
pub trait BackupStream: Send {
    /// Writes the backup to `out` (blocking: run it on a blocking thread).
    fn write_to(
        self: Box<Self>,
        out: &mut dyn std::io::Write,
    ) -> std::result::Result<embedded::backup::Summary, embedded::backup::BackupError>;
}

/// Everything the engine needs from storage. All methods block (they are called from the
/// ingest committer, the delivery writer, the retention thread, and request handlers through
/// `spawn_blocking` or for point reads that take microseconds).
pub trait Storage: Send + Sync + 'static {
    // ---- health and durability ----

    /// Makes every write that returned before this call power-safe.
    fn make_durable(&self) -> Result<()>;
    /// Whether the store can still write: once a write or sync has failed it never will again
    /// (kind [`StoreErrorKind::Unavailable`]); the engine then stops serving and exits.
    fn health(&self) -> Result<()>;
    /// Writes something small and makes it durable: asked at start-up, so that an engine
    /// restarted on a disk that is still full fails before it reports ready.
    fn probe_write(&self) -> Result<()>;
    /// Gives up what this node holds in a shared store (the PostgreSQL lease), after its last
    /// write of a graceful stop. Nothing for a store of its own.
    fn release(&self) {}
    /// The nodes sharing this store; `None` for a store only this process uses.
    fn cluster(&self) -> Result<Option<ClusterView>> {
        Ok(None)
    }
    /// Bytes the store takes on disk (for the disk-space gauge; 0 when not known).
    fn size_on_disk(&self) -> u64;
    /// The engine's memory of its last hour (per-minute counts shown on the overview).
    fn live(&self) -> &crate::stats::live::Live;

    // ---- accounts and webhooks ----

    fn put_account(&self, account: &Account) -> Result<()>;
    fn get_account(&self, id: &AccountId) -> Result<Option<Account>>;
    fn all_accounts(&self) -> Result<Vec<Account>>;
    /// Deletes an account with everything it owns: webhooks, events, deliveries, attempts,
    /// statistics.
    fn delete_account(&self, account: &Account) -> Result<()>;
    fn put_webhook(&self, hook: &Webhook) -> Result<()>;
    fn get_webhook(&self, account: &AccountId, id: WebhookId) -> Result<Option<Webhook>>;
    fn webhooks_of(&self, account: &AccountId) -> Result<Vec<Webhook>>;
    fn all_webhooks(&self) -> Result<Vec<Webhook>>;
    /// Deletes a webhook with its deliveries, attempts and statistics; how many deliveries
    /// were still owed an attempt.
    fn delete_webhook(&self, hook: &Webhook) -> Result<u64>;

    // ---- events (the write-ahead log) ----

    /// The highest event sequence number stored (0: none).
    fn last_seq(&self) -> Result<u64>;
    /// This writer's slot when several nodes write to the store (see
    /// [`crate::ids::Sequencer::for_writer`]); `None`: it is the only writer.
    /// A number that changes whenever any node changes an account or a webhook, and whether
    /// a change since version `seen` was made by another node (nodes sharing the store read
    /// it to keep their registry current; their own changes are in it already). `None` where
    /// one node alone writes.
    fn registry_version(&self, _seen: Option<u64>) -> Result<Option<(u64, bool)>> {
        Ok(None)
    }
    /// The accounts whose records (or webhooks) the changes after version `since` up to
    /// `now` touched, each once; `None` when the store cannot say for the whole range (its
    /// log of changes does not reach back that far): the caller re-reads everything.
    fn registry_changes(&self, _since: u64, _now: u64) -> Result<Option<Vec<AccountId>>> {
        Ok(None)
    }
    fn writer_slot(&self) -> Option<u8> {
        None
    }
    /// The sequence number of an event id the account already used.
    fn event_seq(&self, account: &AccountId, event_id: &str) -> Result<Option<u64>>;
    /// For each (account, producer-chosen id), whether the account already used it: the
    /// committer asks once per group commit. By default one [`Storage::event_seq`] each (a
    /// local lookup is cheap); a store across a network answers in one round trip.
    fn events_known(&self, ids: &[(&AccountId, &str)]) -> Result<Vec<bool>> {
        ids.iter()
            .map(|(account, id)| self.event_seq(account, id).map(|s| s.is_some()))
            .collect()
    }
    /// Appends events, each owing its fan-out (put in the inbox in the same write). Events
    /// come in increasing sequence order, each above every event stored before (the group
    /// committer mints the sequence numbers in commit order).
    fn append_events(&self, events: &[EventRecord]) -> Result<()>;
    /// Appends events; only those marked in `owes_fanout` go into the inbox.
    fn append_events_owing(&self, events: &[EventRecord], owes_fanout: &[bool]) -> Result<()>;
    fn get_event(&self, seq: u64) -> Result<Option<EventRecord>>;
    /// Events whose fan-out is not known to be written (read back at start-up).
    fn inbox(&self) -> Result<Vec<u64>>;
    fn clear_inbox(&self, seqs: &[u64]) -> Result<()>;
    /// The inbox entries of events of accounts in `partitions` (what a node that just took
    /// them over owes). The default reads every event; a backend that shares work keeps the
    /// partition beside the entry.
    fn inbox_in(&self, partitions: &[Partition]) -> Result<Vec<u64>> {
        let mut owed = Vec::new();
        for seq in self.inbox()? {
            if let Some(e) = self.get_event(seq)? {
                if partitions.contains(&partition_of(&e.account_id)) {
                    owed.push(seq);
                }
            }
        }
        Ok(owed)
    }

    // ---- deliveries ----

    /// A delivery as it is now: the held (created, not yet written) one first.
    fn get_delivery(&self, id: DeliveryId) -> Result<Option<DeliveryRecord>>;
    fn attempts(&self, id: DeliveryId) -> Result<Vec<AttemptRecord>>;
    /// Every scheduled attempt, in due order: read back into the wheel at start-up.
    fn scheduled(&self) -> Box<dyn Iterator<Item = Result<(u64, DeliveryId)>> + '_>;
    /// When the earliest owed attempt was due (unix ms), if any is owed.
    /// The schedule entries of deliveries of accounts in `partitions`. The default reads each
    /// delivery; a backend that shares work keeps the partition beside the entry.
    fn scheduled_in(
        &self,
        partitions: &[Partition],
    ) -> Box<dyn Iterator<Item = Result<(u64, DeliveryId)>> + '_> {
        let parts = partitions.to_vec();
        Box::new(self.scheduled().filter_map(move |entry| match entry {
            Ok((due, id)) => match self.get_delivery(id) {
                Ok(Some(d)) if parts.contains(&partition_of(&d.account_id)) => Some(Ok((due, id))),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            },
            Err(e) => Some(Err(e)),
        }))
    }
    fn earliest_due_ms(&self) -> Result<Option<u64>>;
    /// Partitions moved between nodes: forget what is cached of deliveries (another node may
    /// have changed them). Nothing to do where one node serves every partition.
    fn partitions_moved(&self) {}
    /// One page of an account's (or one webhook's) deliveries, newest first.
    fn list_deliveries(&self, account: &AccountId, q: &DeliveryQuery) -> Result<DeliveryPage>;
    /// The deliveries of one webhook that `keep` selects, oldest first. For rare
    /// whole-webhook transitions (a 410, a recover), not for hot paths.
    fn webhook_deliveries(
        &self,
        webhook: WebhookId,
        keep: &dyn Fn(&DeliveryRecord) -> bool,
    ) -> Result<Vec<DeliveryRecord>>;
    /// Applies one drain of the delivery writer, in crash-safe order.
    fn apply_delivery_writes(&self, writes: &DeliveryWrites) -> Result<()>;

    // ---- held deliveries (created, not written yet; see `crate::delivery::held`) ----

    fn is_held(&self, id: DeliveryId) -> bool;
    fn held_delivery(&self, id: DeliveryId) -> Option<DeliveryRecord>;
    fn hold_delivery(&self, record: DeliveryRecord);
    fn release_held(&self, id: DeliveryId) -> Option<DeliveryRecord>;

    // ---- statistics and dashboard sessions ----

    fn add_stats(&self, attempts: &[AttemptStat]) -> Result<()>;
    /// A webhook's hourly counts from `first_hour` (unix hours) on.
    fn webhook_stats(&self, webhook: WebhookId, first_hour: u64) -> Result<Vec<(u64, Counts)>>;
    fn put_session(&self, key: &[u8; 32], session: &str) -> Result<()>;
    fn remove_session(&self, key: &[u8; 32]) -> Result<()>;
    fn sessions(&self) -> Result<Vec<([u8; 32], String)>>;
    /// The stored dashboard session under `key`, if any.
    fn session(&self, key: &[u8; 32]) -> Result<Option<String>> {
        Ok(self
            .sessions()?
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, s)| s))
    }
    /// Whether other nodes serve the same dashboard sessions (nodes dividing the work): a
    /// session is then looked up in the store each time, so that one begun, used or ended on
    /// another node counts here at once.
    fn shares_sessions(&self) -> bool {
        false
    }

    // ---- retention ----

    /// Plans the next batch of closed deliveries last changed before `cutoff_ms`, after
    /// `after` (a read-only scan).
    /// Removes, each as a unit, whole stretches of history that ended before `cutoff_ms` and owe
    /// nothing (no schedule entry, no inbox mark, no delivery open or changed since the
    /// cutoff): the PostgreSQL store drops such day tables, so retention does not delete and
    /// vacuum them row by row. The row-by-row pass that follows finds nothing there. The
    /// default removes nothing.
    fn drop_ended_days(&self, _cutoff_ms: u64) -> Result<Purged> {
        Ok(Purged::default())
    }
    fn plan_purge(&self, cutoff_ms: u64, after: Option<&PurgeCursor>) -> Result<PurgePlan>;
    /// Deletes what `plan` names that is still stored as planned. Only the delivery writer
    /// calls it, so nothing changes a record between the check and the delete.
    fn apply_purge(&self, plan: &PurgePlan) -> Result<PurgedBatch>;
    /// Drops one batch of events older than `cutoff_ms` that nothing refers to any more; how
    /// many, and where the next batch starts (`None`: done). A backend may keep such an event
    /// a while longer (the embedded store drops a chunk of the log once all of it is old).
    fn purge_events(
        &self,
        cutoff_ms: u64,
        after: Option<&PurgeCursor>,
    ) -> Result<(usize, Option<PurgeCursor>)>;
    /// Drops statistics older than `cutoff_ms`; how many hours were dropped.
    fn purge_stats_before(&self, cutoff_ms: u64) -> Result<usize>;

    // ---- backup ----

    /// Starts an online backup (fails when one is running already).
    fn begin_backup(
        self: Arc<Self>,
    ) -> std::result::Result<Box<dyn BackupStream>, embedded::backup::BackupError>;
}

/// One retention pass: plans batch after batch and hands each to `send` (the delivery writer),
/// planning the next while the previous is applied, then drops the events and statistics
/// nothing refers to any more. `go_on` is asked before each batch.
pub fn purge_before_with<E: From<StoreError>, P>(
    store: &dyn Storage,
    cutoff_ms: u64,
    go_on: &dyn Fn() -> bool,
    mut send: impl FnMut(PurgePlan) -> std::result::Result<P, E>,
    mut wait: impl FnMut(P) -> std::result::Result<PurgedBatch, E>,
) -> std::result::Result<Purged, E> {
    let mut purged = if go_on() {
        store.drop_ended_days(cutoff_ms)?
    } else {
        Purged::default()
    };
    let mut add = |batch: PurgedBatch| {
        purged.deliveries += batch.deliveries;
        purged.attempts += batch.attempts;
    };
    let mut after: Option<PurgeCursor> = None;
    let mut pending: Option<P> = None;
    while go_on() {
        let mut plan = store.plan_purge(cutoff_ms, after.as_ref())?;
        let next = plan.next.take();
        if let Some(p) = pending.take() {
            add(wait(p)?);
        }
        if !plan.candidates.is_empty() {
            pending = Some(send(plan)?);
        }
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    if let Some(p) = pending.take() {
        add(wait(p)?);
    }
    let mut after: Option<PurgeCursor> = None;
    while go_on() {
        let (events, next) = store.purge_events(cutoff_ms, after.as_ref())?;
        purged.events += events;
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    if go_on() {
        store.purge_stats_before(cutoff_ms)?;
    }
    Ok(purged)
}

/// [`purge_before_with`] applying each batch in place (tests and tools without a writer).
pub fn purge_before(
    store: &dyn Storage,
    cutoff_ms: u64,
    go_on: &dyn Fn() -> bool,
) -> Result<Purged> {
    purge_before_with(
        store,
        cutoff_ms,
        go_on,
        |plan| Ok(store.apply_purge(&plan)),
        |done| done,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The boundary holds: no code outside `src/store/` names the storage library, so a second
    /// backend needs no change elsewhere. (`grep -rn 'sled::' src | grep -v '^src/store/'`.)
    #[test]
    fn no_code_outside_the_store_names_sled() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut offenders = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path == root.join("store") {
                    continue;
                }
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (n, line) in text.lines().enumerate() {
                        if line.contains("sled::") {
                            offenders.push(format!("{}:{}: {line}", path.display(), n + 1));
                        }
                    }
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "sled named outside src/store/:\n{}",
            offenders.join("\n")
        );
    }

    #[test]
    fn a_failure_keeps_its_kind_when_cloned_for_many_callers() {
        let e = StoreError::new(StoreErrorKind::Unavailable, "disk full");
        let copies = [e.clone(), e.clone()];
        for c in copies {
            assert!(c.is_unavailable() && c.is_retryable());
            assert_eq!(c.to_string(), "disk full");
        }
        assert!(!StoreError::new(StoreErrorKind::Internal, "x").is_retryable());
        assert!(StoreError::new(StoreErrorKind::Io, "x").is_retryable());
    }
}
