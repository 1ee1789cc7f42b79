//! Dispatch: turns due attempts into signed HTTPS requests.
//!
//! Due entries arrive from the scheduler over a bounded channel. The [`Dispatcher`] task (the
//! single owner of rate-limit state) drops entries that are stale or whose webhook stopped
//! (see [`delivery::admit`]), applies the account's plan rate (a delivery that may not go yet is
//! parked back in the wheel at its own slot), and hands the rest to the webhook's slots: a
//! per-webhook semaphore (`delivery.max_in_flight_per_webhook`) with a queue of waiting jobs,
//! so one slow endpoint never holds the engine's slots, and a global semaphore
//! (`delivery.max_in_flight`). Deliveries of `delivery.priority_events` take the account's next
//! rate slot and join the front of the webhook's queue. Test sends use the same slots (at the
//! front of the queue), and
//! an account may run only `delivery.max_test_sends_per_account` of them at once. A webhook
//! with `ordering: "fifo"` passes its due entries through the [`crate::fifo`] gate first:
//! only its first open delivery starts, one attempt at a time; the others are parked there and
//! handed back when their turn comes (test sends are not part of the order).
//!
//! A job is checked again when its attempt actually starts — a pause, delete, URL change or
//! secret rotation made while it waited applies to it. [`Deliverer::send`] signs and sends
//! the request; the outcome goes to the delivery writer ([`crate::delivery`]), which records
//! the attempt, the delivery's new state and its next schedule entry. A due entry that comes
//! in while its delivery is in flight (a manual retry) is parked and re-scheduled when the
//! attempt ends, so it is never lost.

pub mod client;
pub mod netguard;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::clock;
use crate::config::Config;
use crate::delivery::{self, Admission, Deliveries, DeliveryError, InFlight, Settled};
use crate::fifo::Gate;
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{AttemptRecord, DeliveryRecord};
use crate::ratelimit::{Admit, RateLimits};
use crate::registry::Registry;
use crate::scheduler::{Due, SchedulerHandle};
use crate::signing;
use crate::store::{Store, StoreError};

pub use client::{AttemptOutcome, Outbound};

/// Everything an attempt needs; shared by the dispatcher's tasks and the API's test tool.
pub struct Deliverer {
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    pub config: Arc<Config>,
    pub outbound: Outbound,
    pub scheduler: SchedulerHandle,
    /// `delivery.max_in_flight`: every attempt, from any path, holds one of these.
    pub global: Arc<Semaphore>,
    /// The delivery writer: every delivery state change goes through it.
    pub deliveries: Deliveries,
    /// Per-webhook slots and queues, shared by scheduled deliveries and test sends. A std
    /// mutex: held only to look up or insert an entry.
    slots: Mutex<HashMap<WebhookId, Arc<HookSlots>>>,
    /// Deliveries from dispatch to the end of their attempt, each with the due entry that
    /// came in meanwhile (a manual retry), re-scheduled when the attempt ends.
    in_flight: Mutex<HashMap<DeliveryId, Option<Due>>>,
    /// Test sends running per account.
    test_sends: Arc<Mutex<HashMap<AccountId, usize>>>,
}

/// Why a test send did not run.
#[derive(Debug, thiserror::Error)]
pub enum TestSendError {
    #[error("this account already runs {0} test sends at once; try again when one has finished")]
    TooMany(usize),
    #[error("the webhook no longer exists")]
    Gone,
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
}

/// One of an account's concurrent test sends; given back on drop.
pub struct TestPermit {
    account: AccountId,
    counts: Arc<Mutex<HashMap<AccountId, usize>>>,
}

impl Drop for TestPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.account) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.account);
            }
        }
    }
}

impl Deliverer {
    pub fn new(
        store: Arc<Store>,
        registry: Arc<Registry>,
        config: Arc<Config>,
        outbound: Outbound,
        scheduler: SchedulerHandle,
        deliveries: Deliveries,
    ) -> Deliverer {
        Deliverer {
            global: Arc::new(Semaphore::new(config.delivery.max_in_flight)),
            store,
            registry,
            config,
            outbound,
            scheduler,
            deliveries,
            slots: Mutex::default(),
            in_flight: Mutex::default(),
            test_sends: Arc::default(),
        }
    }

    /// Signs and sends the attempt `flight` starts, to the webhook as it was when it started.
    /// Returns the attempt (not yet recorded) and whether it succeeded.
    pub async fn send(&self, flight: &InFlight, body: Bytes) -> (AttemptRecord, bool) {
        let hook = &flight.hook;
        let record = &flight.record;
        let number = flight.number();
        let at_ms = clock::now_ms();
        let signed = signing::sign_request(
            &hook.hook,
            &record.event,
            record.id,
            crate::model::now_ms(),
            &body,
        );
        let (timestamp, signature) = (signed.timestamp, signed.recorded);
        let headers = signed
            .headers
            .into_iter()
            .filter_map(|(k, v)| {
                Some((HeaderName::from_static(k), HeaderValue::from_str(&v).ok()?))
            })
            .collect();
        let outcome = self
            .outbound
            .post(record.id, &hook.hook.url, &hook.ip_allowlist, headers, body)
            .await;
        let success = outcome.is_success();
        metrics::counter!("kyberhook_delivery_attempts_total", "outcome" => if success { "success" } else { "failure" })
            .increment(1);
        metrics::histogram!("kyberhook_delivery_attempt_duration_seconds")
            .record(outcome.elapsed.as_secs_f64());
        let error = outcome.error.clone().or_else(|| {
            outcome
                .status
                .filter(|_| !success)
                .map(|s| format!("endpoint answered {s}"))
        });
        let attempt = AttemptRecord {
            number,
            at_ms,
            response_code: outcome.status,
            response_time_ms: outcome.elapsed.as_millis() as u64,
            response_headers: outcome.headers,
            response_body: outcome.body,
            error,
            timestamp,
            signature,
        };
        (attempt, success)
    }

    /// Takes one of `account`'s concurrent test sends, or refuses when all are in use.
    pub fn test_permit(&self, account: &AccountId) -> Result<TestPermit, TestSendError> {
        let limit = self.config.delivery.max_test_sends_per_account;
        let mut counts = self.test_sends.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(account.clone()).or_insert(0);
        if *n >= limit {
            return Err(TestSendError::TooMany(limit));
        }
        *n += 1;
        Ok(TestPermit {
            account: account.clone(),
            counts: self.test_sends.clone(),
        })
    }

    /// Makes a test send's one attempt through its webhook's slots (ahead of the deliveries
    /// waiting there) and returns it with what became of the delivery. `record` is the test
    /// delivery, not yet stored; `body` its event's body.
    pub async fn test_send(
        self: &Arc<Self>,
        _permit: &TestPermit,
        mut record: DeliveryRecord,
        body: Bytes,
    ) -> Result<(AttemptRecord, Settled), TestSendError> {
        record.next_attempt_ms = None;
        let webhook = record.id.webhook;
        if self.deliveries.create(vec![record.clone()]).await? == 0
            && self.registry.hook(webhook).is_none()
        {
            return Err(TestSendError::Gone);
        }
        let (reply, answer) = oneshot::channel();
        let job = Job::Test(TestJob {
            record,
            body,
            reply,
        });
        self.start_or_queue(webhook, job, true).await;
        answer.await.map_err(|_| DeliveryError::Closed)?
    }

    fn slots_of(&self, webhook: WebhookId) -> Arc<HookSlots> {
        let per_hook = self.config.delivery.max_in_flight_per_webhook;
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(webhook)
            .or_insert_with(|| {
                Arc::new(HookSlots {
                    permits: Arc::new(Semaphore::new(per_hook)),
                    waiting: Mutex::new(VecDeque::new()),
                })
            })
            .clone()
    }

    /// Starts `job` on a free slot of its webhook, or queues it behind the busy ones (at the
    /// front for test sends, which someone is waiting for).
    async fn start_or_queue(
        self: &Arc<Self>,
        webhook: WebhookId,
        job: Job,
        front: bool,
    ) -> Dispatched {
        let slots = self.slots_of(webhook);
        let hook_permit = {
            let mut waiting = slots.waiting.lock().unwrap_or_else(|p| p.into_inner());
            match slots.permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    if front {
                        waiting.push_front(job);
                    } else {
                        waiting.push_back(job);
                    }
                    return Dispatched::Queued;
                }
            }
        };
        let global = self
            .global
            .clone()
            .acquire_owned()
            .await
            .expect("the global semaphore is never closed");
        tokio::spawn(run_jobs(self.clone(), job, slots, hook_permit, global));
        Dispatched::Done
    }

    /// Marks a delivery in flight; if it already is, parks `due` until its attempt ends.
    fn claim(&self, due: Due) -> bool {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        match in_flight.get_mut(&due.id) {
            Some(parked) => {
                *parked = Some(due);
                false
            }
            None => {
                in_flight.insert(due.id, None);
                true
            }
        }
    }

    /// The delivery's attempt ended: a due entry parked meanwhile is scheduled again.
    fn release(&self, id: DeliveryId) {
        let parked = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .flatten();
        if let Some(due) = parked {
            self.scheduler.schedule(due.id, due.token, clock::now_ms());
        }
    }

    /// Runs a scheduled delivery's attempt, if it may still start.
    async fn run_due(&self, due: Due) {
        let admission = match delivery::admit(&self.store, &self.registry, due.id, due.token) {
            Ok(a) => a,
            Err(err) => {
                tracing::error!(delivery = %due.id, error = %err, "reading a delivery failed; it is retried from the store at the next start");
                return;
            }
        };
        let flight = match admission {
            Admission::Stale => return,
            Admission::Stopped(stopped) => {
                if let Err(err) = self.deliveries.stop(stopped).await {
                    tracing::error!(delivery = %due.id, error = %err, "ending a stopped webhook's delivery failed");
                }
                return;
            }
            Admission::Start(flight) => flight,
        };
        let body = match self.store.get_event(due.id.seq) {
            Ok(Some(event)) => event.body,
            Ok(None) => return,
            Err(err) => {
                tracing::error!(delivery = %due.id, error = %err, "reading an event failed");
                return;
            }
        };
        let (attempt, success) = self.send(&flight, Bytes::from(body)).await;
        if let Err(err) = self.deliveries.outcome(&flight, attempt, success).await {
            tracing::error!(delivery = %due.id, error = %err, "recording an attempt failed");
        }
    }

    async fn run_test(&self, job: TestJob) {
        let Some(hook) = self.registry.hook(job.record.id.webhook) else {
            let _ = job.reply.send(Err(TestSendError::Gone));
            return;
        };
        let flight = InFlight::test(job.record, hook);
        let (attempt, success) = self.send(&flight, job.body).await;
        let result = self
            .deliveries
            .outcome(&flight, attempt.clone(), success)
            .await
            .map(|settled| (attempt, settled))
            .map_err(TestSendError::from);
        let _ = job.reply.send(result);
    }
}

/// What became of a due entry: finished with (attempt started, or nothing to do), or queued
/// behind its webhook's busy slots (still waiting, so still counted as scheduled).
enum Dispatched {
    Done,
    Queued,
}

/// A test send waiting for its webhook's slot; someone waits for its answer.
struct TestJob {
    record: DeliveryRecord,
    body: Bytes,
    reply: oneshot::Sender<Result<(AttemptRecord, Settled), TestSendError>>,
}

/// Work for one of a webhook's slots.
enum Job {
    /// A scheduled attempt; checked again when it starts.
    Due(Due),
    Test(TestJob),
}

/// A webhook's slots: its semaphore and the jobs waiting for one of them.
struct HookSlots {
    permits: Arc<Semaphore>,
    waiting: Mutex<VecDeque<Job>>,
}

pub struct Dispatcher {
    deliverer: Arc<Deliverer>,
    limits: RateLimits,
}

impl Dispatcher {
    pub fn new(deliverer: Arc<Deliverer>) -> Self {
        Dispatcher {
            deliverer,
            limits: RateLimits::new(),
        }
    }

    pub async fn run(mut self, mut due: mpsc::Receiver<Due>, mut shutdown: watch::Receiver<bool>) {
        let lag = self.deliverer.scheduler.lag().clone();
        loop {
            let next = match due.try_recv() {
                Ok(next) => Some(next),
                Err(_) => {
                    // Nothing queued for the dispatcher: it owes nothing.
                    lag.dispatching(None);
                    tokio::select! {
                        biased;
                        _ = shutdown.changed() => {
                            if *shutdown.borrow() { break } else { continue }
                        }
                        next = due.recv() => next,
                    }
                }
            };
            let Some(next) = next else { break };
            // While a queue stands, the entry taken last is the oldest owed work (the
            // scheduler hands entries over in due order): its age is the engine's delay.
            lag.dispatching(Some(next.when));
            match self.dispatch(next).await {
                Ok(Dispatched::Queued) => {}
                Ok(Dispatched::Done) => self.deliverer.scheduler.taken(),
                Err(err) => {
                    self.deliverer.scheduler.taken();
                    tracing::error!(error = %err, "dispatch failed; the attempt is retried from the store at the next start");
                }
            }
        }
        // Wait for attempts in flight, so their outcomes are recorded before the store closes.
        let max = self.deliverer.config.delivery.max_in_flight as u32;
        let _ = self.deliverer.global.acquire_many(max).await;
    }

    async fn dispatch(&mut self, due: Due) -> Result<Dispatched, StoreError> {
        let d = &self.deliverer;
        // Checked here so that entries which cannot run take no rate slot, and again when the
        // attempt starts (the job may wait behind its webhook's busy slots).
        let record = match delivery::admit(&d.store, &d.registry, due.id, due.token)? {
            Admission::Stale => return Ok(Dispatched::Done),
            Admission::Stopped(stopped) => {
                let d = d.clone();
                tokio::spawn(async move {
                    if let Err(err) = d.deliveries.stop(stopped).await {
                        tracing::error!(error = %err, "ending a stopped webhook's delivery failed");
                    }
                });
                return Ok(Dispatched::Done);
            }
            Admission::Start(flight) => flight.record,
        };
        // A fifo webhook's delivery waits (parked, still counted as scheduled) until it is
        // the first open one and nothing else of the webhook runs; before the plan's rate, so
        // a waiting delivery takes no rate slot, and before priority, since order wins.
        if d.registry.fifo().try_start(due) == Gate::Parked {
            return Ok(Dispatched::Queued);
        }
        if !d.claim(due) {
            return Ok(Dispatched::Done);
        }
        let per_second = d
            .registry
            .plan_of(&record.account_id)
            .and_then(|p| d.config.plans.get(&p).map(|p| p.events_per_second))
            .unwrap_or(0);
        let priority = d.config.is_priority(&record.event);
        if let Admit::At(when) = self.limits.admit(&record.account_id, per_second, priority) {
            metrics::counter!("kyberhook_rate_limit_deferrals_total").increment(1);
            d.release(due.id);
            d.registry.fifo().finished(due.id);
            d.scheduler.schedule(due.id, due.token, when);
            return Ok(Dispatched::Done);
        }
        // A priority delivery takes the webhook's next free slot: the front of its queue.
        Ok(d.start_or_queue(due.id.webhook, Job::Due(due), priority)
            .await)
    }
}

/// Runs a job, then whatever queued for the same webhook meanwhile, keeping both slots.
async fn run_jobs(
    deliverer: Arc<Deliverer>,
    mut job: Job,
    slots: Arc<HookSlots>,
    hook_permit: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
) {
    loop {
        match job {
            Job::Due(due) => {
                deliverer.run_due(due).await;
                deliverer.release(due.id);
                deliverer.registry.fifo().finished(due.id);
            }
            Job::Test(test) => deliverer.run_test(test).await,
        }
        let mut waiting = slots.waiting.lock().unwrap_or_else(|p| p.into_inner());
        match waiting.pop_front() {
            Some(next) => {
                if matches!(next, Job::Due(_)) {
                    deliverer.scheduler.taken();
                }
                job = next;
            }
            None => {
                // Released under the queue lock, so no job is queued behind a slot that is
                // being given back.
                drop(hook_permit);
                return;
            }
        }
    }
}
