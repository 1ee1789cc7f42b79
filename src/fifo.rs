//! Ordered delivery (`ordering: "fifo"`): which delivery of a fifo webhook may start next.
//!
//! For every fifo webhook the gate keeps, in memory, the ordered set of its open deliveries
//! (pending or retrying, test sends excluded; a [`DeliveryId`] sorts by event sequence), the
//! one whose attempt runs, and the due entries that came while their delivery was not the
//! one to go ("parked"). Data enters from three sides: the delivery writer reports every
//! record it wrote ([`FifoGate::written`], before it hands the drain's entries to the
//! scheduler, so a new delivery is in the set before its first entry can come due); the
//! registry reports every webhook change ([`FifoGate::configure`], [`FifoGate::remove_webhook`]);
//! and the dispatcher asks for every due entry whose delivery is open and webhook active
//! ([`FifoGate::try_start`]) and reports the end of what it let go ([`FifoGate::finished`]).
//! Entries leave again through the scheduler: a parked entry is re-scheduled (due now, or at
//! its own time if later) when its delivery becomes the head and nothing runs, and every
//! other parked entry when it can no longer be the head (its delivery ended, the webhook
//! stopped, was deleted or went back to `none`), so the dispatcher's admission decides about it.
//!
//! A delivery goes only when it is the first open one and no other attempt of the webhook runs:
//! one attempt in flight, in event order; a head that fails holds everything behind it through
//! its retries (it keeps its own schedule entry, so nothing behind it goes meanwhile). The
//! dispatcher asks after admission, so stale and stopped entries never wait, and before the
//! plan rate and priority, so a waiting delivery takes no rate slot and order beats priority; a
//! rate deferral reports `finished` like an attempt's end. Nothing is stored: at start-up
//! [`FifoGate::rebuild`] refills the sets from the stored schedule (every open delivery has an
//! entry there) before dispatch starts; a webhook that becomes fifo at run time reads its open
//! deliveries from the store (`Storage::webhook_deliveries`) on a blocking thread and lets
//! nothing start until that is done. A set entry whose delivery is not open any more (a race
//! with that read or with admission, a stale schedule entry after a crash) would hold the
//! others for ever: whenever entries wait behind a head that nothing runs, moves or loads, the
//! head's record is read, and it leaves the order if it is not open (`Queue::stalled`). That
//! read happens where the call came from — the writer thread, the loader's blocking thread, or
//! the dispatcher's tasks, where admission reads records too. The common case of that check is
//! a head waiting for its own retry: one read per parked arrival.
//!
//! Webhooks with `ordering: "none"` cost one atomic load per call: no lock is taken while no
//! webhook is fifo, and a hash lookup under a std mutex (never held across an await or a
//! store call) otherwise.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::clock;
use crate::ids::{DeliveryId, WebhookId};
use crate::model::{DeliveryOrder, DeliveryRecord, Webhook, WebhookStatus};
use crate::scheduler::{Due, SchedulerHandle};
use crate::store::{Storage, StoreError};

/// Most heads one call confirms against the store.
const CONFIRM_ROUNDS: usize = 64;

/// What the dispatcher does with a due entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Start it (the webhook is not fifo, or this delivery is its head and nothing else runs).
    /// Report the end of the attempt (or that it did not start) with [`FifoGate::finished`].
    Go,
    /// Parked until its turn; still counted as scheduled.
    Parked,
}

/// One fifo webhook's state.
#[derive(Debug, Default)]
struct Queue {
    /// Open deliveries in event order; the first is the head.
    open: BTreeSet<DeliveryId>,
    /// Due entries waiting for their turn: the latest token per delivery.
    parked: HashMap<DeliveryId, Due>,
    /// The delivery whose attempt the gate let go and that has not finished.
    running: Option<DeliveryId>,
    /// Set while the open deliveries are read from the store (the webhook just became
    /// fifo): the read's generation, so that a late read of an earlier switch is ignored.
    loading: Option<u64>,
}

/// What a change asks of the scheduler: entries to hand back, and entries dropped (counted
/// as scheduled until now); and heads to confirm against the store (see `Queue::stalled`).
#[derive(Debug, Default, PartialEq, Eq)]
struct Effects {
    release: Vec<Due>,
    dropped: usize,
    confirm: Vec<DeliveryId>,
}

impl Queue {
    /// Hands back the head's parked entry when it may go.
    fn wake(&mut self, fx: &mut Effects) {
        if self.running.is_some() || self.loading.is_some() {
            return;
        }
        if let Some(head) = self.open.first() {
            if let Some(due) = self.parked.remove(head) {
                fx.release.push(due);
            }
        }
    }

    /// The delivery is not open (any more): it leaves the order, with its parked entry.
    fn close(&mut self, id: DeliveryId, fx: &mut Effects) {
        self.open.remove(&id);
        if let Some(due) = self.parked.remove(&id) {
            fx.release.push(due);
        }
    }

    /// Whether entries wait behind a head that nothing will move: nothing runs, nothing is
    /// loading, and the head has no entry here. That is normal for a head waiting for its own
    /// retry in the wheel — and a sign of a set entry whose delivery is not open any more (a
    /// race with the read of a webhook that became fifo, or a stale schedule entry after a
    /// crash), which would hold the others for ever. The head is then confirmed against the
    /// store (in `FifoGate::apply`).
    fn stalled(&self, fx: &mut Effects) {
        if self.running.is_some() || self.loading.is_some() || self.parked.is_empty() {
            return;
        }
        if let Some(head) = self.open.first() {
            if !self.parked.contains_key(head) {
                fx.confirm.push(*head);
            }
        }
    }

    fn release_all(&mut self, fx: &mut Effects) {
        fx.release.extend(self.parked.drain().map(|(_, due)| due));
    }

    fn try_start(&mut self, due: Due, fx: &mut Effects) -> Gate {
        let id = due.id;
        // Admission found it open: whatever the set missed (a race with the start-up read),
        // it belongs in the order.
        self.open.insert(id);
        let free = self.running.map_or(true, |r| r == id);
        if self.loading.is_none() && free && self.open.first() == Some(&id) {
            self.running = Some(id);
            return Gate::Go;
        }
        match self.parked.get_mut(&id) {
            // Tokens only grow over a delivery's life: the older entry is stale.
            Some(parked) if parked.token >= due.token => fx.dropped += 1,
            Some(parked) => {
                *parked = due;
                fx.dropped += 1;
            }
            None => {
                self.parked.insert(id, due);
            }
        }
        self.stalled(fx);
        Gate::Parked
    }

    fn finished(&mut self, id: DeliveryId, fx: &mut Effects) {
        if self.running == Some(id) {
            self.running = None;
        }
        self.wake(fx);
        self.stalled(fx);
    }
}

/// The queues of every fifo webhook (pure state; [`FifoGate`] adds the lock and the effects).
#[derive(Debug, Default)]
struct Queues {
    by_hook: HashMap<WebhookId, Queue>,
    /// Generations of the reads started for webhooks that became fifo.
    loads: u64,
}

impl Queues {
    /// A webhook's current ordering and status. Answers the generation of a store read to
    /// start when the webhook just became fifo and `live` (at start-up the schedule is read
    /// instead). The parked entries of a webhook that stopped are handed back, so that the
    /// dispatcher's admission ends them as it ends any delivery of a stopped webhook.
    fn configure(&mut self, hook: &Webhook, live: bool, fx: &mut Effects) -> Option<u64> {
        if hook.ordering != DeliveryOrder::Fifo {
            self.remove(hook.id, fx);
            return None;
        }
        match self.by_hook.get_mut(&hook.id) {
            Some(q) => {
                if hook.status != WebhookStatus::Active {
                    q.release_all(fx);
                }
                None
            }
            None => {
                let load = live.then(|| {
                    self.loads += 1;
                    self.loads
                });
                let queue = Queue {
                    loading: load,
                    ..Queue::default()
                };
                self.by_hook.insert(hook.id, queue);
                load
            }
        }
    }

    fn remove(&mut self, id: WebhookId, fx: &mut Effects) {
        if let Some(mut q) = self.by_hook.remove(&id) {
            q.release_all(fx);
        }
    }

    /// The store read of a webhook that became fifo is done.
    fn loaded(
        &mut self,
        hook: WebhookId,
        generation: u64,
        open: Vec<DeliveryId>,
        fx: &mut Effects,
    ) {
        let Some(q) = self.by_hook.get_mut(&hook) else {
            return;
        };
        if q.loading != Some(generation) {
            return;
        }
        q.open.extend(open);
        q.loading = None;
        q.wake(fx);
        q.stalled(fx);
    }

    fn written(&mut self, record: &DeliveryRecord, fx: &mut Effects) {
        let Some(q) = self.by_hook.get_mut(&record.id.webhook) else {
            return;
        };
        if record.status.is_open() && !record.is_test {
            q.open.insert(record.id);
        } else {
            q.close(record.id, fx);
        }
    }
}

/// Parts the gate needs once the engine runs: where parked entries go back to, and the store
/// and runtime for the read of a webhook that becomes fifo.
struct Wiring {
    scheduler: SchedulerHandle,
    store: Arc<dyn Storage>,
    runtime: tokio::runtime::Handle,
}

/// The engine's fifo gate (held by the registry, which every stage already holds).
pub struct FifoGate {
    /// How many webhooks are fifo: while none is, no call takes the lock.
    hooks: AtomicUsize,
    queues: Mutex<Queues>,
    wiring: OnceLock<Wiring>,
}

impl Default for FifoGate {
    fn default() -> Self {
        FifoGate::new()
    }
}

impl FifoGate {
    pub fn new() -> FifoGate {
        FifoGate {
            hooks: AtomicUsize::new(0),
            queues: Mutex::default(),
            wiring: OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn idle(&self) -> bool {
        self.hooks.load(Ordering::Acquire) == 0
    }

    /// Connects the gate to the running engine, after [`FifoGate::rebuild`] and before the
    /// dispatcher starts. From now on a webhook that becomes fifo reads its open deliveries.
    pub fn wire(&self, scheduler: SchedulerHandle, store: Arc<dyn Storage>) {
        let _ = self.wiring.set(Wiring {
            scheduler,
            store,
            runtime: tokio::runtime::Handle::current(),
        });
    }

    /// Hands entries back to the scheduler (each was counted as scheduled while parked), then
    /// confirms the heads that hold others while nothing moves them.
    fn apply(&self, fx: Effects) {
        let Some(w) = self.wiring.get() else {
            return;
        };
        let mut confirm = self.reschedule(w, fx);
        // Bounded: each round removes one delivery from a set, and a burst of stale entries
        // (a crash) is worked off by the next calls.
        for _ in 0..CONFIRM_ROUNDS {
            let Some(head) = confirm.pop() else { return };
            match w.store.get_delivery(head) {
                Ok(Some(r)) if r.status.is_open() && !r.is_test => continue,
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(delivery = %head, error = %err, "reading a fifo webhook's first open delivery failed");
                    continue;
                }
            }
            let mut fx = Effects::default();
            if let Some(queue) = self.lock().by_hook.get_mut(&head.webhook) {
                queue.close(head, &mut fx);
                queue.wake(&mut fx);
                queue.stalled(&mut fx);
            }
            confirm.extend(self.reschedule(w, fx));
        }
    }

    /// The scheduler's part of `fx`; answers the heads to confirm.
    fn reschedule(&self, w: &Wiring, fx: Effects) -> Vec<DeliveryId> {
        for _ in 0..fx.dropped {
            w.scheduler.taken();
        }
        let now = clock::now_ms();
        for due in fx.release {
            w.scheduler.taken();
            w.scheduler.schedule(due.id, due.token, due.token.max(now));
        }
        fx.confirm
    }

    /// The registry stored `hook` (created, changed, loaded at start-up).
    pub fn configure(self: &Arc<Self>, hook: &Webhook) {
        if hook.ordering != DeliveryOrder::Fifo && self.idle() {
            return;
        }
        let mut fx = Effects::default();
        let load = {
            let mut q = self.lock();
            let load = q.configure(hook, self.wiring.get().is_some(), &mut fx);
            self.hooks.store(q.by_hook.len(), Ordering::Release);
            load
        };
        self.apply(fx);
        if let Some(generation) = load {
            self.load(hook.id, generation);
        }
    }

    /// Reads the open deliveries of a webhook that just became fifo, off the runtime.
    fn load(self: &Arc<Self>, hook: WebhookId, generation: u64) {
        let Some(w) = self.wiring.get() else {
            return;
        };
        let store = w.store.clone();
        let gate = Arc::downgrade(self);
        w.runtime.spawn_blocking(move || {
            let open = match store.webhook_deliveries(hook, &|r: &DeliveryRecord| r.status.is_open() && !r.is_test)
            {
                Ok(records) => records.into_iter().map(|r| r.id).collect(),
                Err(err) => {
                    // Admission still puts every due delivery into the order; only one that
                    // comes due later than a younger one may go first.
                    tracing::error!(webhook = %hook, error = %err, "reading a webhook's open deliveries for fifo ordering failed");
                    Vec::new()
                }
            };
            if let Some(gate) = gate.upgrade() {
                let mut fx = Effects::default();
                gate.lock().loaded(hook, generation, open, &mut fx);
                gate.apply(fx);
            }
        });
    }

    /// The webhook is deleted (alone or with its account).
    pub fn remove_webhook(&self, id: WebhookId) {
        if self.idle() {
            return;
        }
        let mut fx = Effects::default();
        {
            let mut q = self.lock();
            q.remove(id, &mut fx);
            self.hooks.store(q.by_hook.len(), Ordering::Release);
        }
        self.apply(fx);
    }

    /// Start-up, before dispatch: every scheduled delivery of a fifo webhook is open.
    pub fn rebuild(
        &self,
        schedule: impl IntoIterator<Item = Result<(u64, DeliveryId), StoreError>>,
    ) -> Result<(), StoreError> {
        if self.idle() {
            return Ok(());
        }
        let mut q = self.lock();
        for entry in schedule {
            let (_, id) = entry?;
            if let Some(queue) = q.by_hook.get_mut(&id.webhook) {
                queue.open.insert(id);
            }
        }
        Ok(())
    }

    /// The delivery writer wrote these records (called before their schedule entries reach
    /// the scheduler).
    pub fn written<'a>(&self, records: impl IntoIterator<Item = &'a DeliveryRecord>) {
        if self.idle() {
            return;
        }
        let mut fx = Effects::default();
        {
            let mut q = self.lock();
            let mut touched: Vec<WebhookId> = Vec::new();
            for r in records {
                if q.by_hook.contains_key(&r.id.webhook) {
                    q.written(r, &mut fx);
                    touched.push(r.id.webhook);
                }
            }
            touched.sort_unstable();
            touched.dedup();
            for hook in touched {
                if let Some(queue) = q.by_hook.get_mut(&hook) {
                    queue.wake(&mut fx);
                    queue.stalled(&mut fx);
                }
            }
        }
        self.apply(fx);
    }

    /// May this due entry start? Asked for entries whose delivery is open and webhook active.
    pub fn try_start(&self, due: Due) -> Gate {
        if self.idle() {
            return Gate::Go;
        }
        let mut fx = Effects::default();
        let gate = {
            let mut q = self.lock();
            match q.by_hook.get_mut(&due.id.webhook) {
                Some(queue) => queue.try_start(due, &mut fx),
                None => Gate::Go,
            }
        };
        self.apply(fx);
        gate
    }

    /// What [`FifoGate::try_start`] let go has ended (attempted, deferred, or not started).
    pub fn finished(&self, id: DeliveryId) {
        if self.idle() {
            return;
        }
        let mut fx = Effects::default();
        if let Some(queue) = self.lock().by_hook.get_mut(&id.webhook) {
            queue.finished(id, &mut fx);
        }
        self.apply(fx);
    }

    /// Deliveries waiting for their turn (parked), all fifo webhooks together.
    pub fn parked(&self) -> usize {
        if self.idle() {
            return 0;
        }
        self.lock().by_hook.values().map(|q| q.parked.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, EventId};
    use crate::model::DeliveryStatus;
    use crate::store::embedded::SledStore;

    const HOOK: WebhookId = WebhookId(7);

    fn id(seq: u64) -> DeliveryId {
        DeliveryId { seq, webhook: HOOK }
    }

    fn due(seq: u64, token: u64) -> Due {
        Due {
            id: id(seq),
            token,
            when: token,
        }
    }

    fn hook(ordering: DeliveryOrder, status: WebhookStatus) -> Webhook {
        Webhook {
            id: HOOK,
            account_id: AccountId::parse("acc_1").unwrap(),
            name: "h".into(),
            url: "https://example.com/".into(),
            description: None,
            events: vec!["*".into()],
            ip_allowlist: vec![],
            status,
            disabled_reason: None,
            consecutive_failures: 0,
            secret: "whsec_x".into(),
            created_ms: 0,
            updated_ms: 0,
            signature_scheme: Default::default(),
            previous_secret: None,
            rotation_ends_ms: None,
            ordering,
            max_concurrency: None,
        }
    }

    fn record(seq: u64, status: DeliveryStatus) -> DeliveryRecord {
        DeliveryRecord {
            id: id(seq),
            account_id: AccountId::parse("acc_1").unwrap(),
            event_id: EventId::from_seq(seq),
            event: "user.login".into(),
            status,
            attempt_count: 0,
            response_code: None,
            response_time_ms: None,
            updated_ms: 0,
            next_attempt_ms: status.is_open().then_some(seq),
            note: None,
            is_test: false,
        }
    }

    /// A fifo webhook with deliveries 1..=n open, as the writer reports them.
    fn queues(n: u64) -> Queues {
        let mut q = Queues::default();
        let mut fx = Effects::default();
        assert_eq!(
            q.configure(
                &hook(DeliveryOrder::Fifo, WebhookStatus::Active),
                false,
                &mut fx
            ),
            None
        );
        for seq in 1..=n {
            q.written(&record(seq, DeliveryStatus::Pending), &mut fx);
        }
        assert_eq!(fx, Effects::default());
        q
    }

    fn start(q: &mut Queues, d: Due, fx: &mut Effects) -> Gate {
        q.by_hook.get_mut(&HOOK).unwrap().try_start(d, fx)
    }

    fn finish(q: &mut Queues, seq: u64, fx: &mut Effects) {
        q.by_hook.get_mut(&HOOK).unwrap().finished(id(seq), fx);
    }

    #[test]
    fn only_the_first_open_delivery_goes_and_the_next_is_handed_back_when_it_ends() {
        let mut q = queues(3);
        let mut fx = Effects::default();
        // Due out of order: 3 waits for 1 — which nothing runs or holds yet, so 1 is to be
        // confirmed open.
        assert_eq!(start(&mut q, due(3, 3), &mut fx), Gate::Parked);
        assert_eq!(fx.confirm, vec![id(1)]);
        let mut fx = Effects::default();
        assert_eq!(start(&mut q, due(1, 1), &mut fx), Gate::Go);
        assert_eq!(start(&mut q, due(2, 2), &mut fx), Gate::Parked, "1 runs");
        assert_eq!(fx, Effects::default());
        // 1 fails and retries: still first, nothing behind it moves (and 1, waiting for its
        // retry in the wheel, is confirmed open).
        q.written(&record(1, DeliveryStatus::Retrying), &mut fx);
        finish(&mut q, 1, &mut fx);
        assert_eq!((fx.release, fx.confirm), (vec![], vec![id(1)]));
        let mut fx = Effects::default();
        assert_eq!(start(&mut q, due(1, 50), &mut fx), Gate::Go, "its retry");
        // 1 is delivered: the writer's report comes before the attempt's end, and 2 is handed
        // back only once the attempt has ended.
        q.written(&record(1, DeliveryStatus::Delivered), &mut fx);
        assert_eq!(fx, Effects::default());
        finish(&mut q, 1, &mut fx);
        assert_eq!(fx.release, vec![due(2, 2)]);
        assert_eq!(start(&mut q, due(2, 2), &mut fx), Gate::Go);
        // 2 fails for good: 3 goes next.
        let mut fx = Effects::default();
        q.written(&record(2, DeliveryStatus::Failed), &mut fx);
        finish(&mut q, 2, &mut fx);
        assert_eq!(fx.release, vec![due(3, 3)]);
    }

    #[test]
    fn a_reopened_earlier_delivery_waits_for_the_running_one_then_goes_first() {
        let mut q = queues(3);
        let mut fx = Effects::default();
        q.written(&record(1, DeliveryStatus::Failed), &mut fx);
        assert_eq!(start(&mut q, due(2, 2), &mut fx), Gate::Go);
        // A manual retry reopens 1 while 2 runs: 1 waits for 2's attempt, 3 waits for both.
        q.written(&record(1, DeliveryStatus::Retrying), &mut fx);
        assert_eq!(start(&mut q, due(1, 90), &mut fx), Gate::Parked);
        assert_eq!(start(&mut q, due(3, 3), &mut fx), Gate::Parked);
        assert!(fx.confirm.is_empty(), "2 runs");
        q.written(&record(2, DeliveryStatus::Delivered), &mut fx);
        finish(&mut q, 2, &mut fx);
        assert_eq!(fx.release, vec![due(1, 90)]);
    }

    #[test]
    fn an_older_or_repeated_entry_is_dropped_and_a_newer_one_replaces_it() {
        let mut q = queues(2);
        let mut fx = Effects::default();
        assert_eq!(start(&mut q, due(1, 1), &mut fx), Gate::Go);
        start(&mut q, due(2, 20), &mut fx);
        start(&mut q, due(2, 20), &mut fx);
        start(&mut q, due(2, 10), &mut fx);
        assert_eq!(fx.dropped, 2);
        start(&mut q, due(2, 30), &mut fx);
        assert_eq!(fx.dropped, 3);
        q.written(&record(1, DeliveryStatus::Delivered), &mut fx);
        finish(&mut q, 1, &mut fx);
        assert_eq!(fx.release, vec![due(2, 30)]);
    }

    #[test]
    fn a_head_that_holds_others_while_nothing_moves_it_is_named_for_confirmation() {
        // The set has 1 (say, from a stale schedule entry), but 1 never comes due.
        let mut q = queues(1);
        let mut fx = Effects::default();
        assert_eq!(start(&mut q, due(2, 2), &mut fx), Gate::Parked);
        assert_eq!(fx.confirm, vec![id(1)]);
        let queue = q.by_hook.get_mut(&HOOK).unwrap();
        queue.close(id(1), &mut fx);
        queue.wake(&mut fx);
        assert_eq!(fx.release, vec![due(2, 2)]);
        // An attempt's end with others parked behind a head that has no entry: the same.
        let mut q = queues(3);
        let mut fx = Effects::default();
        assert_eq!(start(&mut q, due(2, 2), &mut fx), Gate::Parked);
        let mut fx = Effects::default();
        let queue = q.by_hook.get_mut(&HOOK).unwrap();
        queue.running = Some(id(3)); // an attempt let go before 1 and 2 were known
        queue.finished(id(3), &mut fx);
        assert_eq!(fx.confirm, vec![id(1)]);
    }

    /// The whole loop with a real store and scheduler: a set entry whose delivery does not
    /// exist holds delivery 2 only until the gate has read it.
    #[tokio::test(start_paused = true)]
    async fn a_stale_head_is_read_from_the_store_and_the_next_delivery_is_handed_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), false).unwrap());
        store
            .apply_delivery_writes(&crate::store::DeliveryWrites {
                deliveries: vec![record(2, DeliveryStatus::Pending)],
                ..Default::default()
            })
            .unwrap();
        let (out, mut due_rx) = tokio::sync::mpsc::channel(8);
        let (scheduler, handle) = crate::scheduler::Scheduler::new(out);
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(scheduler.run(None, stop_rx));
        let gate = Arc::new(FifoGate::new());
        gate.configure(&hook(DeliveryOrder::Fifo, WebhookStatus::Active));
        gate.rebuild([Ok((1, id(1))), Ok((2, id(2)))]).unwrap();
        gate.wire(handle.clone(), store);
        // Delivery 2 comes due (counted as scheduled, as the scheduler had handed it out).
        handle.schedule(id(2), 2, 0);
        let first = due_rx.recv().await.unwrap();
        assert_eq!(gate.try_start(first), Gate::Parked);
        // 1 is not in the store: it left the order, and 2 was handed back at once.
        let again = due_rx.recv().await.unwrap();
        assert_eq!((again.id, again.token), (id(2), 2));
        assert_eq!(gate.try_start(again), Gate::Go);
        assert_eq!(gate.parked(), 0);
        assert_eq!(
            handle.scheduled(),
            1,
            "counted once, until its attempt starts"
        );
        task.abort();
    }

    #[test]
    fn a_stopped_deleted_or_unordered_webhook_hands_every_parked_entry_back() {
        for change in ["paused", "none", "deleted"] {
            let mut q = queues(3);
            let mut fx = Effects::default();
            assert_eq!(start(&mut q, due(1, 1), &mut fx), Gate::Go);
            start(&mut q, due(2, 2), &mut fx);
            start(&mut q, due(3, 3), &mut fx);
            match change {
                "paused" => {
                    let h = hook(DeliveryOrder::Fifo, WebhookStatus::Paused);
                    assert_eq!(q.configure(&h, true, &mut fx), None);
                    assert!(q.by_hook.contains_key(&HOOK), "still fifo");
                }
                "none" => {
                    let h = hook(DeliveryOrder::Unordered, WebhookStatus::Active);
                    assert_eq!(q.configure(&h, true, &mut fx), None);
                    assert!(q.by_hook.is_empty());
                }
                _ => q.remove(HOOK, &mut fx),
            }
            fx.release.sort_by_key(|d| d.id);
            assert_eq!(fx.release, vec![due(2, 2), due(3, 3)], "{change}");
        }
    }

    #[test]
    fn a_webhook_that_becomes_fifo_starts_nothing_until_its_open_deliveries_are_read() {
        let mut q = Queues::default();
        let mut fx = Effects::default();
        let h = hook(DeliveryOrder::Fifo, WebhookStatus::Active);
        let generation = q.configure(&h, true, &mut fx).expect("a read to start");
        // Entries come due meanwhile: parked, whatever their place.
        assert_eq!(start(&mut q, due(5, 5), &mut fx), Gate::Parked);
        // A read of an earlier switch is ignored.
        q.loaded(HOOK, generation + 1, vec![id(9)], &mut fx);
        assert_eq!(fx, Effects::default());
        // The read finds 2 open: it goes first, 5 stays parked (and 2, whose entry is not
        // here yet, is to be confirmed open).
        q.loaded(HOOK, generation, vec![id(2), id(5)], &mut fx);
        assert_eq!((fx.release, fx.confirm), (vec![], vec![id(2)]));
        let mut fx = Effects::default();
        assert_eq!(start(&mut q, due(2, 2), &mut fx), Gate::Go);
        q.written(&record(2, DeliveryStatus::Delivered), &mut fx);
        finish(&mut q, 2, &mut fx);
        assert_eq!(fx.release, vec![due(5, 5)]);
    }

    #[test]
    fn test_sends_and_other_webhooks_are_not_part_of_the_order() {
        let mut q = queues(1);
        let mut fx = Effects::default();
        let mut test = record(0, DeliveryStatus::Pending);
        test.is_test = true;
        q.written(&test, &mut fx);
        assert_eq!(
            q.by_hook[&HOOK].open.iter().copied().collect::<Vec<_>>(),
            vec![id(1)]
        );
        let gate = FifoGate::new();
        assert_eq!(
            gate.try_start(Due {
                id: DeliveryId {
                    seq: 1,
                    webhook: WebhookId(8)
                },
                token: 1,
                when: 1,
            }),
            Gate::Go
        );
    }
}
