//! The delivery writer: the one thread that applies every change to delivery records.
//!
//! Commands arrive over the bounded channel the [`super::Deliveries`] handle sends on. The
//! writer blocks for one, drains what else is queued (up to [`MAX_DRAIN`]), and applies each
//! [`Change`] against an in-memory overlay, the [`Drain`] (so a retry and an outcome of one
//! delivery in the same drain see each other): it reads the record, asks the state machine
//! (`state.rs`) for the transition, and records what that returns — the record, its
//! schedule entry moves, the wheel entry to arm. Then it writes the whole drain tree by tree
//! in crash-safe order ([`crate::store::Storage::apply_delivery_writes`]: new schedule
//! entries, attempts, records, index entries, then superseded schedule entries), and only
//! after that updates fifo order ([`crate::fifo`]) and backlog counts ([`crate::backlog`]),
//! hands wheel entries to the scheduler, applies webhook failure counts (auto-disable), and
//! answers the callers. Barriers (`Forget`, `WriteHeld`) write what came before them first;
//! retention's `Purge` batches run after the drain they arrived in. Fan-out's new deliveries
//! are held rather than written (`held.rs`, `store/embedded/held.rs`) until their first
//! attempt settles or their window ends.
//!
//! An outcome's attempt is written in the same drain as the removal of the attempt that leaves
//! the kept history window ([`crate::history`]). A `410 Gone` disables its webhook here, under
//! the registry's write lock; the webhook's other open deliveries are found by
//! `Storage::webhook_deliveries` (a rare scan of `by_webhook`) and ended in a drain of their
//! own. Creates and outcomes for a webhook no longer in the registry write nothing (fan-out
//! may race a deletion, and an attempt may end after it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam::channel::{self, Receiver};

use super::held::{HeldBatches, HELD_WINDOW};
use super::state::{self, Settled, Step};
use super::{Change, Command, DeliveryError, Forget, Reply};
use crate::clock;
use crate::config::Config;
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{AttemptRecord, DeliveryRecord, DeliveryStatus, WebhookStatus};
use crate::registry::Registry;
use crate::scheduler::SchedulerHandle;
use crate::store::{DeliveryWrites, Storage, StoreError};

/// Most commands one drain applies (bounds the latency one drain adds).
const MAX_DRAIN: usize = 4096;

/// Starts the writer thread on `rx`; it ends once every sender is gone.
pub(super) fn spawn(
    store: Arc<dyn Storage>,
    registry: Arc<Registry>,
    config: Arc<Config>,
    scheduler: SchedulerHandle,
    rx: Receiver<Command>,
) -> JoinHandle<()> {
    let ctx = WriterContext {
        store,
        registry,
        config,
        scheduler,
    };
    std::thread::Builder::new()
        .name("kyberhook-delivery-writer".into())
        .spawn(move || ctx.run(rx))
        .expect("spawning the delivery writer thread")
}

/// What the writer thread works with.
struct WriterContext {
    store: Arc<dyn Storage>,
    registry: Arc<Registry>,
    config: Arc<Config>,
    scheduler: SchedulerHandle,
}

/// An answer to send once the drain's writes are on the store (or failed).
pub(super) type Answer = Box<dyn FnOnce(Option<&DeliveryError>) + Send>;

fn answer<T: Send + 'static>(reply: Reply<T>, value: T) -> Answer {
    Box::new(move |failed| {
        reply.send(match failed {
            Some(err) => Err(err.clone()),
            None => Ok(value),
        })
    })
}

/// The changes of one drain, applied against an overlay of the records it touched.
#[derive(Default)]
struct Drain {
    /// Records changed in this drain (reads see them before the store).
    records: HashMap<DeliveryId, DeliveryRecord>,
    /// Whether each schedule entry touched should exist at the end of the drain.
    schedule: HashMap<(u64, DeliveryId), bool>,
    attempts: Vec<(DeliveryId, AttemptRecord)>,
    indexed: Vec<(AccountId, DeliveryId)>,
    /// Wheel entries to hand to the scheduler once written: (id, token, when).
    wheel: Vec<(DeliveryId, u64, u64)>,
    /// Webhook outcomes for the failure count, in order.
    outcomes: Vec<(WebhookId, bool)>,
    /// Attempts for their webhooks' statistics (test sends excluded).
    stats: Vec<crate::stats::AttemptStat>,
    /// Webhooks whose endpoint answered `410 Gone`, with the delivery that got it.
    gone: Vec<(WebhookId, DeliveryId)>,
    /// Changes of whether a delivery waits for an attempt, for the account's backlog count:
    /// (account, old due, new due).
    backlog: Vec<(AccountId, Option<u64>, Option<u64>)>,
    answers: Vec<Answer>,
    /// Batches of deliveries this drain began to hold, with the answer each waits for.
    held: Vec<(Vec<DeliveryId>, Answer)>,
}

impl Drain {
    fn is_empty(&self) -> bool {
        self.answers.is_empty() && self.records.is_empty() && self.held.is_empty()
    }

    fn get(
        &self,
        store: &dyn Storage,
        id: DeliveryId,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        match self.records.get(&id) {
            Some(r) => Ok(Some(r.clone())),
            None => store.get_delivery(id),
        }
    }

    /// Stores `record`, moving its schedule entry from `old_due` to its `next_attempt_ms`, and
    /// its account's backlog count with it.
    fn put(&mut self, record: DeliveryRecord, old_due: Option<u64>) {
        self.backlog
            .push((record.account_id.clone(), old_due, record.next_attempt_ms));
        self.put_uncounted(record, old_due);
    }

    /// [`Drain::put`] without the backlog count (recovery: the start-up recount covers it).
    fn put_uncounted(&mut self, record: DeliveryRecord, old_due: Option<u64>) {
        if old_due != record.next_attempt_ms {
            if let Some(due) = old_due {
                self.schedule.insert((due, record.id), false);
            }
        }
        if let Some(due) = record.next_attempt_ms {
            self.schedule.insert((due, record.id), true);
        }
        self.records.insert(record.id, record);
    }

    /// Stores `record` as a transition left it: moves its schedule entry as `step` says and
    /// arms its wheel entry once written.
    fn apply(&mut self, record: DeliveryRecord, step: Step) {
        if let Some(wake) = step.wake {
            self.wheel.push((record.id, wake.token, wake.at));
        }
        self.put(record, step.old_due);
    }
}

impl WriterContext {
    fn run(self, rx: Receiver<Command>) {
        let mut held = HeldBatches::default();
        loop {
            let first = match held.next_due() {
                None => match rx.recv() {
                    Ok(cmd) => Some(cmd),
                    Err(_) => break,
                },
                Some(until) => match rx.recv_deadline(until) {
                    Ok(cmd) => Some(cmd),
                    Err(channel::RecvTimeoutError::Timeout) => None,
                    Err(channel::RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut drain = Drain::default();
            let mut purges = Vec::new();
            let mut next = first;
            let mut taken = 0;
            while let Some(cmd) = next.take() {
                taken += 1;
                match cmd {
                    Command::Forget { what, reply } => {
                        // Everything before it is written first, so it deletes what they wrote.
                        self.commit(std::mem::take(&mut drain), &mut held);
                        self.write_held(&mut held, None);
                        let result = match &what {
                            Forget::Webhook(hook) => {
                                self.store.delete_webhook(hook).map(|waiting| {
                                    self.registry.backlog().remove(&hook.account_id, waiting)
                                })
                            }
                            Forget::Account(account) => {
                                self.store.delete_account(account).map(|()| {
                                    // Outcomes applied before this may have counted again.
                                    self.registry.backlog().forget(&account.id)
                                })
                            }
                        };
                        reply.send(result.map_err(Into::into));
                    }
                    Command::WriteHeld { reply } => {
                        self.commit(std::mem::take(&mut drain), &mut held);
                        self.write_held(&mut held, None);
                        reply.send(Ok(()));
                    }
                    // Applied after this drain is written, so that its re-check sees every
                    // change the drain made (a retry in it keeps its delivery).
                    Command::Purge { plan, reply } => purges.push((plan, reply)),
                    Command::Apply(change) => self.apply(&mut drain, change),
                }
                if taken < MAX_DRAIN {
                    next = rx.try_recv().ok();
                }
            }
            self.commit(drain, &mut held);
            for (plan, reply) in purges {
                let started = std::time::Instant::now();
                let result = self.store.apply_purge(&plan);
                metrics::histogram!("kyberhook_retention_writer_seconds")
                    .record(started.elapsed().as_secs_f64());
                reply.send(result.map_err(Into::into));
            }
            self.write_held(&mut held, Some(Instant::now()));
        }
        // Every handle is gone (shutdown): nothing stays held.
        self.write_held(&mut held, None);
    }

    /// Writes, as created, the held deliveries of batches whose window ended by `now` (the
    /// oldest beyond the cap too), at most about [`MAX_DRAIN`] of them, so that outcomes
    /// waiting behind are not held up by a burst; the run loop comes back for the rest. With
    /// `None`, writes everything held. Deliveries written meanwhile (their attempt settled)
    /// are not written again; a batch is answered once its last held delivery is written.
    fn write_held(&self, held: &mut HeldBatches, now: Option<Instant>) {
        let (due_ids, due_end) = held.due(now, MAX_DRAIN);
        let mut d = Drain::default();
        for id in due_ids {
            match self.store.held_delivery(id) {
                Some(record) => {
                    if let (true, Some(due)) = (record.status.is_open(), record.next_attempt_ms) {
                        d.schedule.insert((due, id), true);
                    }
                    d.records.insert(id, record);
                }
                // Not held any more (never expected: a held delivery leaves the overlay only
                // by being written, which also takes it off its batch): nothing to write, and
                // its batch must not wait for it, or the loop would come back for it forever.
                None => d.answers.extend(held.written(id)),
            }
        }
        // Their batches are answered by `commit` as their last held delivery is written.
        if let Some(err) = self.commit(d, held) {
            // The store refuses writes: stop holding them rather than retry in a loop. Their
            // attempts find nothing to send, and their events' fan-out (still owed, the
            // batches answer the error) re-runs at the next start.
            held.abandon(due_end, &err, |id| {
                self.store.release_held(id);
            });
        }
    }

    /// Applies one change into the drain: reads the record (the drain's copy first), has the
    /// state machine make the transition, and records what it returns.
    fn apply(&self, d: &mut Drain, change: Change) {
        let now = clock::now_ms();
        match change {
            Change::Create {
                records,
                recovery,
                reply,
            } => match self.create(d, records, recovery) {
                Ok(n) => d.answers.push(answer(reply, n)),
                Err(e) => reply.send(Err(e.into())),
            },
            Change::CreateHeld {
                records,
                scheduled,
                written,
            } => {
                d.answers.push(answer(scheduled, ()));
                self.create_held(d, records, written);
            }
            Change::Outcome {
                id,
                token,
                is_test,
                attempt,
                success,
                reply,
            } => {
                let record = match d.get(&*self.store, id) {
                    Ok(r) => r,
                    Err(e) => return reply.send(Err(e.into())),
                };
                // A deleted webhook's deliveries are deleted (or about to be, by a Forget
                // queued behind this): write nothing for them.
                let Some(mut record) = record.filter(|_| self.registry.hook(id.webhook).is_some())
                else {
                    return d.answers.push(answer(reply, Settled::Gone));
                };
                if state::endpoint_gone(&attempt, is_test)
                    && !d.gone.iter().any(|(h, _)| *h == id.webhook)
                {
                    d.gone.push((id.webhook, id));
                }
                let (settled, step) =
                    state::settle(&mut record, token, &attempt, success, &self.config, now);
                if !is_test {
                    d.stats.extend(crate::stats::AttemptStat::of(
                        id.webhook, &attempt, success, &settled,
                    ));
                }
                d.attempts.push((id, attempt));
                d.apply(record, step);
                if !is_test {
                    d.outcomes.push((id.webhook, success));
                }
                d.answers.push(answer(reply, settled));
            }
            Change::Retry { id, account, reply } => {
                let record = match d.get(&*self.store, id) {
                    Ok(r) => r,
                    Err(e) => return reply.send(Err(e.into())),
                };
                let Some(mut record) = record.filter(|r| {
                    r.account_id == account && self.registry.hook(id.webhook).is_some()
                }) else {
                    return d.answers.push(answer(reply, None));
                };
                let step = state::retry_by_hand(&mut record, now);
                d.apply(record.clone(), step);
                d.answers.push(answer(reply, Some(record)));
            }
            Change::Stop { stopped, reply } => {
                let record = match d.get(&*self.store, stopped.id) {
                    Ok(r) => r,
                    Err(e) => return reply.send(Err(e.into())),
                };
                if let Some(mut record) = record {
                    if let Some(step) = state::stop(&mut record, &stopped, now) {
                        d.apply(record, step);
                    }
                }
                d.answers.push(answer(reply, ()));
            }
            Change::Recover {
                webhook,
                since_ms,
                until_ms,
                reply,
            } => {
                if self.registry.hook(webhook).is_none() {
                    return d.answers.push(answer(reply, 0));
                }
                let ended = |r: &DeliveryRecord| state::recoverable(r, since_ms, until_ms);
                let found = match self.store.webhook_deliveries(webhook, &ended) {
                    Ok(found) => found,
                    Err(e) => return reply.send(Err(e.into())),
                };
                let mut n = 0;
                for stored in found {
                    // This drain may have changed it already.
                    let Ok(Some(mut record)) = d.get(&*self.store, stored.id) else {
                        continue;
                    };
                    if !ended(&record) {
                        continue;
                    }
                    let step = state::recover(&mut record, now);
                    d.apply(record, step);
                    n += 1;
                }
                d.answers.push(answer(reply, n));
            }
        }
    }

    /// Holds fan-out's new deliveries (see [`HELD_WINDOW`]) and schedules their
    /// first attempts. A fifo webhook's deliveries are written at once: its order is kept
    /// from written records.
    fn create_held(&self, d: &mut Drain, records: Vec<DeliveryRecord>, reply: Reply<usize>) {
        let mut ids = Vec::with_capacity(records.len());
        let mut owed = 0;
        for r in records {
            // As in `create`: a webhook deleted meanwhile gets no delivery.
            let Some(hook) = self.registry.hook(r.id.webhook) else {
                continue;
            };
            if let Some(due) = r.next_attempt_ms {
                d.wheel.push((r.id, due, due));
                owed += 1;
            }
            if hook.hook.ordering == crate::model::DeliveryOrder::Fifo {
                d.indexed.push((r.account_id.clone(), r.id));
                d.put(r, None);
                continue;
            }
            d.backlog
                .push((r.account_id.clone(), None, r.next_attempt_ms));
            ids.push(r.id);
            self.store.hold_delivery(r);
        }
        let answer = answer(reply, owed);
        if ids.is_empty() {
            d.answers.push(answer);
        } else {
            d.held.push((ids, answer));
        }
    }

    fn create(
        &self,
        d: &mut Drain,
        records: Vec<DeliveryRecord>,
        recovery: bool,
    ) -> Result<usize, StoreError> {
        let mut owed = 0;
        for r in records {
            // Fan-out may race a webhook's deletion: a delivery for a webhook no longer in the
            // registry would outlive the Forget that deletes its siblings.
            if self.registry.hook(r.id.webhook).is_none() {
                continue;
            }
            let existing = if recovery {
                d.get(&*self.store, r.id)?
            } else {
                None
            };
            match existing {
                Some(existing) => {
                    // Its index and schedule entries may not have reached the disk.
                    d.indexed.push((existing.account_id.clone(), existing.id));
                    if let (true, Some(due)) = (existing.status.is_open(), existing.next_attempt_ms)
                    {
                        d.schedule.insert((due, existing.id), true);
                        d.wheel.push((existing.id, due, due));
                        owed += 1;
                    }
                }
                None => {
                    d.indexed.push((r.account_id.clone(), r.id));
                    if let Some(due) = r.next_attempt_ms {
                        d.wheel.push((r.id, due, due));
                        owed += 1;
                    }
                    if recovery {
                        // Counted by the backlog's recount of the schedule after start-up.
                        d.put_uncounted(r, None);
                    } else {
                        d.put(r, None);
                    }
                }
            }
        }
        Ok(owed)
    }

    /// Writes a drain, schedules its wheel entries, applies its webhook side effects, then
    /// answers its callers.
    ///
    /// Held deliveries among the drain's records are written here for the first time: with
    /// their index entries, and without removing a schedule entry, since none was written for
    /// them. The batches the drain began to hold go into `held` once their attempts are
    /// scheduled (or are answered with the error).
    fn commit(&self, mut d: Drain, held: &mut HeldBatches) -> Option<DeliveryError> {
        if d.is_empty() {
            return None;
        }
        let first_written: HashSet<DeliveryId> = d
            .records
            .keys()
            .copied()
            .filter(|id| self.store.is_held(*id))
            .collect();
        let mut still_pending = 0u64;
        for id in &first_written {
            let record = &d.records[id];
            if record.status == DeliveryStatus::Pending {
                still_pending += 1;
            }
            d.indexed.push((record.account_id.clone(), *id));
            // Readers see the new state from here on, never the one it replaces.
            self.store.hold_delivery(record.clone());
        }
        let mut writes = DeliveryWrites {
            attempts: d.attempts,
            deliveries: d.records.into_values().collect(),
            indexed: d.indexed,
            stats: d.stats,
            ..Default::default()
        };
        for ((due, id), keep) in d.schedule {
            if keep {
                writes.schedule_insert.push((due, id));
            } else if !first_written.contains(&id) {
                writes.schedule_remove.push((due, id));
            }
        }
        let failed = match self.store.apply_delivery_writes(&writes) {
            Ok(()) => None,
            Err(e) => {
                tracing::error!(error = %e, "writing delivery changes failed; owed attempts are retried from the store at the next start");
                Some(DeliveryError::from(e))
            }
        };
        let mut batches_done = Vec::new();
        if failed.is_none() {
            for id in &first_written {
                self.store.release_held(*id);
                batches_done.extend(held.written(*id));
            }
            metrics::counter!("kyberhook_held_deliveries_written_total", "state" => "settled")
                .increment(first_written.len() as u64 - still_pending);
            metrics::counter!("kyberhook_held_deliveries_written_total", "state" => "pending")
                .increment(still_pending);
        }
        let until = Instant::now() + HELD_WINDOW;
        for (ids, answer) in d.held {
            if let Some(err) = &failed {
                // Never scheduled: the events' fan-out is re-run at the next start.
                for id in &ids {
                    self.store.release_held(*id);
                }
                answer(Some(err));
                continue;
            }
            held.add(until, ids, answer);
        }
        if failed.is_none() {
            // Before the wheel entries below: a fifo webhook's new delivery must be in its
            // order before its first entry can come due.
            self.registry.fifo().written(&writes.deliveries);
            let backlog = self.registry.backlog();
            for (account, old_due, new_due) in &d.backlog {
                backlog.track(account, *old_due, *new_due);
            }
            for (id, token, when) in d.wheel {
                self.scheduler.schedule(id, token, when);
            }
        }
        // Webhook side effects (failure counts, auto-disable, a 410's disable) are applied
        // before the callers hear the outcome, so that whoever reads the webhook after a
        // delivery settled sees the count that delivery left.
        if failed.is_none() {
            if let Err(err) = self.count_outcomes(&d.outcomes) {
                tracing::warn!(error = %err, "updating webhook failure counts failed");
            }
            for (hook, by) in d.gone {
                if let Err(err) = self.disable_gone(hook, by, held) {
                    tracing::warn!(webhook = %hook, error = %err, "disabling a webhook whose endpoint answered 410 failed");
                }
            }
        }
        for a in d.answers.into_iter().chain(batches_done) {
            a(failed.as_ref());
        }
        held.trim();
        failed
    }

    /// The endpoint answered `410 Gone`: disables the webhook at once and ends its open
    /// deliveries `failed` (an attempt still in flight settles on its own when it ends).
    fn disable_gone(
        &self,
        id: WebhookId,
        by: DeliveryId,
        held: &mut HeldBatches,
    ) -> Result<(), StoreError> {
        {
            let Some(current) = self.registry.hook(id) else {
                return Ok(());
            };
            let _writes = self.registry.write_lock();
            let Some(mut hook) = self.store.get_webhook(&current.hook.account_id, id)? else {
                return Ok(());
            };
            hook.status = WebhookStatus::Disabled;
            hook.disabled_reason = Some(format!(
                "disabled automatically: the endpoint answered 410 Gone to delivery {by}"
            ));
            hook.updated_ms = crate::model::now_ms();
            self.store.put_webhook(&hook)?;
            self.registry.upsert_hook(hook);
        }
        metrics::counter!("kyberhook_webhooks_auto_disabled_total").increment(1);
        tracing::warn!(webhook = %id, delivery = %by, "webhook disabled: its endpoint answered 410 Gone");
        let now = clock::now_ms();
        let mut drain = Drain::default();
        for mut record in self
            .store
            .webhook_deliveries(id, &|r: &DeliveryRecord| r.status.is_open())?
        {
            let step = state::end_gone(&mut record, now);
            drain.apply(record, step);
        }
        self.commit(drain, held);
        Ok(())
    }

    /// Consecutive failures per webhook, across deliveries; enough of them disable it. One
    /// webhook write per webhook per drain.
    fn count_outcomes(&self, outcomes: &[(WebhookId, bool)]) -> Result<(), StoreError> {
        let mut by_hook: Vec<(WebhookId, Vec<bool>)> = Vec::new();
        for (id, success) in outcomes {
            match by_hook.iter_mut().find(|(h, _)| h == id) {
                Some((_, list)) => list.push(*success),
                None => by_hook.push((*id, vec![*success])),
            }
        }
        for (id, results) in by_hook {
            let Some(current) = self.registry.hook(id) else {
                continue;
            };
            if current.hook.consecutive_failures == 0 && results.iter().all(|s| *s) {
                continue;
            }
            let _writes = self.registry.write_lock();
            let Some(mut hook) = self.store.get_webhook(&current.hook.account_id, id)? else {
                continue;
            };
            let limit = self.config.delivery.auto_disable_after;
            for success in results {
                if success {
                    hook.consecutive_failures = 0;
                    continue;
                }
                hook.consecutive_failures = hook.consecutive_failures.saturating_add(1);
                if hook.consecutive_failures >= limit && hook.status == WebhookStatus::Active {
                    hook.status = WebhookStatus::Disabled;
                    hook.disabled_reason = Some(format!(
                        "disabled automatically after {limit} consecutive failed attempts"
                    ));
                    hook.updated_ms = crate::model::now_ms();
                    metrics::counter!("kyberhook_webhooks_auto_disabled_total").increment(1);
                    tracing::warn!(webhook = %id, "webhook disabled after {limit} consecutive failures");
                }
            }
            self.store.put_webhook(&hook)?;
            self.registry.upsert_hook(hook);
        }
        Ok(())
    }
}
