//! The hand-over: what this node's engine does when the PostgreSQL ownership loop
//! (`store::postgres::ownership::run`) gives it partitions of accounts, asks it to hand some
//! over, or finds some lost. Nodes sharing a store divide the partitions; each runs the
//! deliveries of its own, with the same wheel, rate limiter, FIFO gate and backlog as one node
//! alone, over just those accounts.
//!
//! In: the loop's calls ([`PartitionWork`]). Out: the node's [`Shares`] (read by the
//! dispatcher, the store's fence and the front door) and the work loaded or dropped:
//!
//! - **gained** — the partitions are served at once (their requests are taken here from now
//!   on, and their writes fenced at the new epoch); then, in order on one worker: the
//!   registry's copy of their accounts and webhooks is read afresh, the fan-out their previous
//!   owner owed is re-run from the inbox, their FIFO webhooks are reloaded, and their stored
//!   schedule goes into the wheel and the backlog counts. A load that fails is retried.
//! - **drain** — no attempt of theirs starts any more (the dispatcher drops their entries as
//!   stale: the new owner runs them from the stored schedule); the future resolves when none
//!   is in flight and the deliveries the writer still holds in memory are written, and the
//!   loop then releases them.
//! - **lost** — taken over without a hand-over: dropped at once. Their writes fail the fence.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::clock;
use crate::delivery::DeliveryError;
use crate::dispatch::Deliverer;
use crate::ids::{AccountId, DeliveryId};
use crate::ingest::Ingest;
use crate::partition::{partition_of, Partition, Shares};
use crate::registry::Registry;
use crate::store::postgres::ownership::{self, PartitionWork};
use crate::store::{Storage, StoreError};

/// How long a failed load waits before it is tried again.
const RETRY_LOAD: Duration = Duration::from_millis(500);

/// How often a drain looks whether its attempts in flight have ended.
const DRAIN_POLL: Duration = Duration::from_millis(20);

enum Job {
    Load(Vec<(Partition, i64)>),
    Drop(Vec<Partition>),
}

/// The ownership loop's [`PartitionWork`]: marks [`Shares`] at once and queues the loads and
/// drops for its worker.
#[derive(Clone)]
pub struct Handover {
    inner: Arc<Inner>,
    jobs: mpsc::UnboundedSender<Job>,
}

/// The engine's parts a hand-over touches: the deliverer (and through it the store, the
/// registry, the scheduler, the delivery writer and this node's [`Shares`]) and ingest. The
/// worker holds only this, so it ends (and lets the committer and the delivery writer go)
/// once the last [`Handover`] is dropped.
struct Inner {
    ingest: Ingest,
    deliverer: Arc<Deliverer>,
    /// Loads queued or running ([`Handover::settled`]).
    pending: AtomicUsize,
}

/// Counts a load as finished when dropped.
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The partitions as the engine numbers them (the ownership loop's are the stored `i16`).
fn engine_partitions(parts: impl IntoIterator<Item = ownership::Partition>) -> Vec<Partition> {
    parts
        .into_iter()
        .filter_map(Partition::from_stored)
        .collect()
}

impl Handover {
    /// Starts the worker that loads and drops partitions in the order asked.
    pub fn start(
        ingest: Ingest,
        deliverer: Arc<Deliverer>,
    ) -> (Handover, tokio::task::JoinHandle<()>) {
        let (jobs, mut rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            ingest,
            deliverer,
            pending: AtomicUsize::new(0),
        });
        let worker = inner.clone();
        let task = tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                match job {
                    Job::Load(parts) => worker.load(parts).await,
                    Job::Drop(parts) => {
                        let w = worker.clone();
                        let _ = tokio::task::spawn_blocking(move || w.drop_work(&parts)).await;
                    }
                }
            }
        });
        (Handover { inner, jobs }, task)
    }
}

impl Handover {
    /// Waits until no partition load is queued or running (at most `limit`): a node starting
    /// serves its first partitions once their work is loaded.
    pub async fn settled(&self, limit: Duration) -> bool {
        let until = tokio::time::Instant::now() + limit;
        while self.inner.pending.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

impl Inner {
    fn shares(&self) -> &Shares {
        &self.deliverer.shares
    }

    /// Loads `parts` until it succeeds or they are not held any more, then serves them.
    async fn load(self: &Arc<Self>, parts: Vec<(Partition, i64)>) {
        let _pending = Pending(&self.pending);
        loop {
            // Still held at the epoch gained (not lost, or lost and gained again since).
            let held: Vec<(Partition, i64)> = parts
                .iter()
                .copied()
                .filter(|(p, e)| self.shares().epoch(*p) == Some(*e))
                .collect();
            let still: Vec<Partition> = held.iter().map(|(p, _)| *p).collect();
            if still.is_empty() {
                return;
            }
            let me = self.clone();
            let started = std::time::Instant::now();
            let loaded =
                tokio::task::spawn_blocking(move || me.load_blocking(&held).map(|n| (n, still)))
                    .await;
            match loaded {
                Ok(Ok(((owed, scheduled), still))) => {
                    tracing::info!(
                        partitions = still.len(),
                        owed_fanout = owed,
                        scheduled,
                        ms = started.elapsed().as_millis() as u64,
                        "took over partitions"
                    );
                    return;
                }
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "loading the work of partitions taken over failed; trying again");
                }
                Err(err) => tracing::error!(error = %err, "a partition load task failed"),
            }
            tokio::time::sleep(RETRY_LOAD).await;
        }
    }

    /// Reads the work of `held` (partitions and the epochs they were gained at) into the
    /// engine and serves them; returns the events whose fan-out was owed and the attempts
    /// scheduled.
    fn load_blocking(&self, held: &[(Partition, i64)]) -> Result<(usize, usize), DeliveryError> {
        let parts: Vec<Partition> = held.iter().map(|(p, _)| *p).collect();
        let parts = &parts[..];
        let set: BTreeSet<Partition> = parts.iter().copied().collect();
        let in_scope = |a: &AccountId| set.contains(&partition_of(a));
        // Another node owned them: whatever this one cached of their deliveries may be old.
        self.deliverer.store.partitions_moved();
        let store = &*self.deliverer.store;
        self.deliverer.registry.sync(
            || Ok::<_, StoreError>((store.all_accounts()?, store.all_webhooks()?)),
            in_scope,
        )?;
        let owed = self.ingest.recover_owed(store, parts)?;
        let entries: Vec<(u64, DeliveryId)> =
            store.scheduled_in(parts).collect::<Result<_, _>>()?;
        // FIFO webhooks read their open deliveries afresh (the previous owner moved them on).
        for hook in self.deliverer.registry.hooks_where(in_scope) {
            self.deliverer.registry.fifo().remove_webhook(hook.id);
            self.deliverer.registry.fifo().configure(&hook);
        }
        self.deliverer.registry.backlog().recount(
            &entries,
            |h| {
                self.deliverer
                    .registry
                    .hook(h)
                    .map(|e| e.hook.account_id.clone())
            },
            in_scope,
        );
        // Served from here on: the entries below may be due at once, and admission drops
        // those of a partition not served. (Whatever recovery scheduled before this and was
        // dropped so is among `entries`: read after it was written.)
        for (p, e) in held {
            self.shares().loaded(*p, *e);
        }
        let now = clock::now_ms();
        for (due, id) in &entries {
            self.deliverer
                .scheduler
                .schedule(*id, *due, (*due).max(now));
        }
        Ok((owed, entries.len()))
    }

    /// Drops what this node keeps in memory for `parts` (not served any more).
    fn drop_work(&self, parts: &[Partition]) {
        let set: BTreeSet<Partition> = parts.iter().copied().collect();
        let in_scope = |a: &AccountId| set.contains(&partition_of(a));
        for hook in self.deliverer.registry.hooks_where(in_scope) {
            self.deliverer.registry.fifo().remove_webhook(hook.id);
            self.deliverer.registry.backlog().forget(&hook.account_id);
        }
        self.deliverer.store.partitions_moved();
    }
}

impl PartitionWork for Handover {
    fn gained(&self, partitions: &[(ownership::Partition, i64)]) {
        let mut parts = Vec::new();
        for (p, epoch) in partitions {
            if let Some(part) = engine_partitions([*p]).pop() {
                // Held (its recovery writes pass the fence), served once loaded.
                self.inner.shares().hold(part, *epoch);
                parts.push((part, *epoch));
            }
        }
        self.inner.pending.fetch_add(1, Ordering::AcqRel);
        if self.jobs.send(Job::Load(parts)).is_err() {
            self.inner.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn drain(
        &self,
        partitions: &[ownership::Partition],
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let parts = engine_partitions(partitions.iter().copied());
        for p in &parts {
            self.inner.shares().drain(*p);
        }
        let me = self.clone();
        Box::pin(async move {
            let set: BTreeSet<Partition> = parts.iter().copied().collect();
            // No attempt outlasts the delivery timeout; one still counted after that was
            // queued behind a busy webhook and never started (or the engine is stopping and
            // will not start it): the next owner runs it from the stored schedule.
            let deliverer = &me.inner.deliverer;
            let until = tokio::time::Instant::now()
                + deliverer.config.delivery.timeout
                + Duration::from_secs(1);
            while deliverer.in_flight_in(&set) > 0 {
                if tokio::time::Instant::now() >= until {
                    tracing::warn!(
                        left = deliverer.in_flight_in(&set),
                        "handing partitions over with deliveries still counted in flight; their next owner may attempt them again"
                    );
                    break;
                }
                tokio::time::sleep(DRAIN_POLL).await;
            }
            // Fan-out's records held in memory are written before the partitions go.
            let deliveries = me.inner.deliverer.deliveries.clone();
            if let Ok(Err(err)) =
                tokio::task::spawn_blocking(move || deliveries.write_held_blocking()).await
            {
                tracing::warn!(error = %err, "writing held deliveries before a hand-over failed; the next owner re-runs their fan-out");
            }
            for p in &parts {
                me.inner.shares().forget(*p);
            }
            let _ = me.jobs.send(Job::Drop(parts));
        })
    }

    fn lost(&self, partitions: &[ownership::Partition]) {
        let parts = engine_partitions(partitions.iter().copied());
        for p in &parts {
            self.inner.shares().forget(*p);
        }
        let _ = self.jobs.send(Job::Drop(parts));
    }
}

/// How often a node dividing the work reads the registry's version.
pub const REGISTRY_POLL: Duration = Duration::from_millis(250);

/// The most changed accounts the registry follower re-reads one by one; more, and it reads
/// every account and webhook in two statements instead.
const ONE_BY_ONE_MAX: usize = 32;

/// Keeps this node's registry current with what other nodes change (divided mode): reads the
/// store's registry version every [`REGISTRY_POLL`] and, when another node moved it, re-reads
/// the accounts its log of changes names (all of them when the log does not reach back) and
/// takes in what differs ([`Registry::sync`]), so that a pause, edit, rotation or plan
/// change made through any node governs this node's deliveries within a second. Ends when
/// `stop` turns true.
pub async fn follow_registry(
    store: Arc<dyn Storage>,
    registry: Arc<Registry>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut seen: Option<u64> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REGISTRY_POLL) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        let (s, r) = (store.clone(), registry.clone());
        let last = seen;
        let read = tokio::task::spawn_blocking(move || -> Result<Option<u64>, StoreError> {
            let Some((now, elsewhere)) = s.registry_version(last)? else {
                return Ok(None);
            };
            if elsewhere {
                let store = &*s;
                // Only the accounts the log says changed (two reads each, under the
                // registry's write lock); everything when it cannot say, or when that many
                // accounts cost more to read one by one than all at once.
                let touched = match last {
                    Some(since) => store.registry_changes(since, now)?,
                    None => None,
                };
                let changed = match touched {
                    Some(accounts) if accounts.len() <= ONE_BY_ONE_MAX => {
                        let accounts: HashSet<AccountId> = accounts.into_iter().collect();
                        r.sync(
                            || {
                                let (mut found, mut hooks) = (Vec::new(), Vec::new());
                                for id in &accounts {
                                    found.extend(store.get_account(id)?);
                                    hooks.extend(store.webhooks_of(id)?);
                                }
                                Ok::<_, StoreError>((found, hooks))
                            },
                            |a| accounts.contains(a),
                        )?
                    }
                    _ => r.sync(
                        || Ok::<_, StoreError>((store.all_accounts()?, store.all_webhooks()?)),
                        |_| true,
                    )?,
                };
                if changed > 0 && last.is_some() {
                    tracing::debug!(
                        changed,
                        "took in accounts and webhooks changed on other nodes"
                    );
                }
            }
            Ok(Some(now))
        })
        .await;
        match read {
            Ok(Ok(Some(now))) => seen = Some(now),
            Ok(Ok(None)) => return,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "reading the registry's changes failed; trying again")
            }
            Err(err) => tracing::error!(error = %err, "the registry follower's task failed"),
        }
    }
}
