//! Dispatch: turns due attempts into signed HTTPS requests.
//!
//! Due entries arrive from the scheduler over a bounded channel. The [`Dispatcher`] task (the
//! single owner of rate-limit state) takes each through, in this order:
//!
//! 1. **admission** ([`delivery::admit`]): an entry whose token the stored record no longer
//!    carries is stale and dropped; one of a paused or disabled webhook ends its delivery;
//! 2. the **fifo gate** ([`crate::fifo`]), for a webhook with `ordering: "fifo"`: only its
//!    first open delivery starts, one attempt at a time; the others are parked there and
//!    handed back when their turn comes (test sends are not part of the order). It comes
//!    before the plan rate and priority, so a waiting delivery takes no rate slot and order
//!    beats priority;
//! 3. the account's **plan rate** ([`crate::ratelimit`]): a delivery that may not go yet is
//!    parked back in the wheel at its own future slot (and handed back to the fifo gate);
//!    deliveries of `delivery.priority_events` get the account's earliest slot instead, and
//!    reserve it;
//! 4. the webhook's **slots** ([`slots`]): an attempt holds one of the engine's slots
//!    (`delivery.max_in_flight`) and counts against its webhook's adaptive limit
//!    ([`concurrency`]); when the webhook is at its limit its jobs queue behind it rather than
//!    taking engine slots, so one slow endpoint never holds the others'. Priority deliveries
//!    and test sends join the front of the webhook's queue.
//!
//! The slots and the in-flight map live in the shared [`Deliverer`], not in the dispatcher
//! task, because the API's test sends use them too (at the front of the queue; an account may
//! run only `delivery.max_test_sends_per_account` of them at once, 429 beyond). The
//! dispatcher never awaits a slot: it submits, and whoever frees a slot gets back the jobs
//! that may start and runs one of its own webhook's on the same task (a warm connection).
//!
//! A queued job holds only the delivery id and its token, and is admitted again when its
//! attempt actually starts — a pause, delete, URL change or secret rotation made while it
//! waited applies to it. [`Deliverer::send`] signs and sends the request; the outcome goes to
//! the delivery writer ([`crate::delivery`]), which records the attempt, the delivery's new
//! state and its next schedule entry. A due entry that comes in while its delivery is in
//! flight (a manual retry) is parked in the in-flight map and re-scheduled when the attempt
//! ends, so it is never swallowed.

pub mod client;
pub mod concurrency;
pub mod netguard;
pub mod slots;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock;
use crate::config::Config;
use crate::delivery::{self, Admission, Deliveries, DeliveryError, InFlight, Settled};
use crate::fifo::Gate;
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{AttemptRecord, DeliveryRecord, Webhook};
use crate::partition::{partition_of, Partition, Shares};
use crate::ratelimit::{Admit, RateLimits};
use crate::registry::Registry;
use crate::scheduler::{Due, SchedulerHandle};
use crate::signing;
use crate::store::{Storage, StoreError};

pub use client::{AttemptOutcome, Outbound};
use concurrency::Signal;
pub use slots::HookView;
use slots::{Ended, Queued, Slots, Start};

/// Everything an attempt needs; shared by the dispatcher's tasks and the API's test tool.
pub struct Deliverer {
    pub store: Arc<dyn Storage>,
    pub registry: Arc<Registry>,
    pub config: Arc<Config>,
    pub outbound: Outbound,
    pub scheduler: SchedulerHandle,
    /// The delivery writer: every delivery state change goes through it.
    pub deliveries: Deliveries,
    /// The partitions this node serves: an attempt for any other account does not start.
    pub shares: Arc<Shares>,
    /// The engine's slots (`delivery.max_in_flight`) and each webhook's queue and adaptive
    /// limit, shared by scheduled deliveries and test sends.
    slots: Slots<Job>,
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
        store: Arc<dyn Storage>,
        registry: Arc<Registry>,
        config: Arc<Config>,
        outbound: Outbound,
        scheduler: SchedulerHandle,
        deliveries: Deliveries,
        shares: Arc<Shares>,
    ) -> Deliverer {
        Deliverer {
            shares,
            slots: Slots::new(
                config.delivery.max_in_flight,
                config.delivery.max_in_flight_per_webhook,
            ),
            store,
            registry,
            config,
            outbound,
            scheduler,
            deliveries,
            in_flight: Mutex::default(),
            test_sends: Arc::default(),
        }
    }

    /// Signs and sends the attempt `flight` starts, to the webhook as it was when it started.
    /// Returns the attempt (not yet recorded), whether it succeeded, and how long the endpoint
    /// took (the adaptive limit's sample).
    pub async fn send(&self, flight: &InFlight, body: Bytes) -> (AttemptRecord, bool, Duration) {
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
        (attempt, success, outcome.elapsed)
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
    /// delivery (created as a test send: no schedule entry), not yet stored; `body` its
    /// event's body.
    pub async fn test_send(
        self: &Arc<Self>,
        _permit: &TestPermit,
        record: DeliveryRecord,
        body: Bytes,
    ) -> Result<(AttemptRecord, Settled), TestSendError> {
        let webhook = record.id.webhook;
        if self.deliveries.create(vec![record.clone()]).await? == 0
            && self.registry.hook(webhook).is_none()
        {
            return Err(TestSendError::Gone);
        }
        let (reply, answer) = oneshot::channel();
        let account = record.account_id.clone();
        let cap = self
            .registry
            .hook(webhook)
            .and_then(|h| h.hook.max_concurrency);
        let job = Job::Test(TestJob {
            record,
            body,
            reply,
        });
        self.submit(webhook, &account, cap, job, true, clock::now_ms());
        answer.await.map_err(|_| DeliveryError::Closed)?
    }

    /// Queues `job` on its webhook's slots (ahead of its queue if `urgent`) and starts what
    /// may start now, each on a task of its own that goes on with the webhook's next jobs.
    fn submit(
        self: &Arc<Self>,
        webhook: WebhookId,
        account: &AccountId,
        cap: Option<u32>,
        job: Job,
        urgent: bool,
        since_ms: u64,
    ) {
        let queued = Queued {
            webhook,
            account,
            cap,
            job,
            urgent,
            since_ms,
        };
        let starts = self.slots.submit(queued, clock::now_ms());
        for start in starts {
            self.start(start);
        }
    }

    fn start(self: &Arc<Self>, start: Start<Job>) {
        self.starting(&start.job);
        tokio::spawn(run_jobs(self.clone(), start));
    }

    /// A job leaves the slots' queue for its attempt: a scheduled one stops counting as
    /// scheduled (it did until now).
    fn starting(&self, job: &Job) {
        if matches!(job, Job::Due(_)) {
            self.scheduler.taken();
        }
    }

    /// What a webhook's slots look like now: its adaptive limit and what waits.
    pub fn slots_of(&self, hook: &Webhook) -> HookView {
        self.slots
            .view(hook.id, hook.max_concurrency, clock::now_ms())
    }

    /// Samples who waits (see [`slots`]) and publishes it to push-back and the metrics page:
    /// each account's engine-caused wait, the oldest backlog of any webhook, the attempts in
    /// flight.
    pub fn sample_slots(&self) {
        let sample = self.slots.sample(clock::now_ms(), clock::now_us());
        let lag = self.scheduler.lag();
        lag.slots_sampled(sample.oldest_ms, sample.in_flight);
        lag.webhooks_waiting(sample.engine_waits);
    }

    /// How many attempts are in flight for accounts in `partitions` (a hand-over waits for
    /// none to be left).
    pub fn in_flight_in(&self, partitions: &std::collections::BTreeSet<Partition>) -> usize {
        let ids: Vec<DeliveryId> = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        ids.iter()
            .filter_map(|id| self.registry.hook(id.webhook))
            .filter(|h| partitions.contains(&partition_of(&h.hook.account_id)))
            .count()
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

    /// Runs a scheduled delivery's attempt, if it may still start; returns what the attempt
    /// said about the endpoint (nothing when none was made).
    async fn run_due(&self, due: Due) -> Ended {
        let admission = match delivery::admit(
            &*self.store,
            &self.registry,
            &self.shares,
            due.id,
            due.token,
        ) {
            Ok(a) => a,
            Err(err) => {
                tracing::error!(delivery = %due.id, error = %err, "reading a delivery failed; it is retried from the store at the next start");
                return Ended::NOTHING;
            }
        };
        let flight = match admission {
            Admission::Stale => return Ended::NOTHING,
            Admission::Stopped(stopped) => {
                if let Err(err) = self.deliveries.stop(stopped).await {
                    tracing::error!(delivery = %due.id, error = %err, "ending a stopped webhook's delivery failed");
                }
                return Ended::NOTHING;
            }
            Admission::Start(flight) => flight,
        };
        let body = match self.store.get_event(due.id.seq) {
            Ok(Some(event)) => event.body,
            Ok(None) => return Ended::NOTHING,
            Err(err) => {
                tracing::error!(delivery = %due.id, error = %err, "reading an event failed");
                return Ended::NOTHING;
            }
        };
        let (attempt, success, rtt) = self.send(&flight, Bytes::from(body)).await;
        let ended = Ended {
            signal: Signal::of(attempt.response_code),
            rtt,
            cap: Some(flight.hook.hook.max_concurrency),
        };
        if let Err(err) = self.deliveries.outcome(&flight, attempt, success).await {
            tracing::error!(delivery = %due.id, error = %err, "recording an attempt failed");
        }
        ended
    }

    async fn run_test(&self, job: TestJob) -> Ended {
        let Some(hook) = self.registry.hook(job.record.id.webhook) else {
            let _ = job.reply.send(Err(TestSendError::Gone));
            return Ended::NOTHING;
        };
        let flight = InFlight::test(job.record, hook);
        let (attempt, success, rtt) = self.send(&flight, job.body).await;
        let ended = Ended {
            signal: Signal::of(attempt.response_code),
            rtt,
            cap: Some(flight.hook.hook.max_concurrency),
        };
        let result = self
            .deliveries
            .outcome(&flight, attempt.clone(), success)
            .await
            .map(|settled| (attempt, settled))
            .map_err(TestSendError::from);
        let _ = job.reply.send(result);
        ended
    }
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

pub struct Dispatcher {
    deliverer: Arc<Deliverer>,
    limits: RateLimits,
    /// When the limiters of deleted accounts and unused client pools were last dropped.
    last_upkeep: std::time::Instant,
}

/// How often the dispatcher drops deleted accounts' limiters and client pools no webhook uses.
const UPKEEP_EVERY: Duration = Duration::from_secs(60);

impl Dispatcher {
    pub fn new(deliverer: Arc<Deliverer>) -> Self {
        Dispatcher {
            deliverer,
            limits: RateLimits::new(),
            last_upkeep: std::time::Instant::now(),
        }
    }

    pub async fn run(mut self, mut due: mpsc::Receiver<Due>, mut shutdown: watch::Receiver<bool>) {
        let lag = self.deliverer.scheduler.lag().clone();
        let sampler = tokio::spawn(sample_slots(self.deliverer.clone(), shutdown.clone()));
        let mut since_yield = 0u32;
        loop {
            // Entries are only queued here (never awaited on), so a long run of them would
            // otherwise keep this worker from the attempts it starts.
            since_yield += 1;
            if since_yield >= 256 {
                since_yield = 0;
                tokio::task::yield_now().await;
                self.upkeep();
            }
            let next = match due.try_recv() {
                Ok(next) => Some(next),
                Err(_) => {
                    // Nothing queued for the dispatcher: it owes nothing.
                    lag.dispatching(None);
                    self.upkeep();
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
            if let Err(err) = self.dispatch(next) {
                tracing::error!(error = %err, "dispatch failed; the attempt is retried from the store at the next start");
            }
        }
        // Start nothing more; wait for attempts in flight, so their outcomes are recorded
        // before the store closes.
        self.deliverer.slots.close();
        self.deliverer.slots.drained().await;
        // What is still marked in flight was queued and never started: nothing runs now.
        self.deliverer
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        sampler.abort();
    }

    /// Drops what deleted accounts and webhooks left behind: rate limiters and pooled outbound
    /// clients (the slots forget idle webhooks themselves). Cheap to call; works once a minute.
    fn upkeep(&mut self) {
        if self.last_upkeep.elapsed() < UPKEEP_EVERY {
            return;
        }
        self.last_upkeep = std::time::Instant::now();
        let registry = &self.deliverer.registry;
        self.limits.retain(|a| registry.account_exists(a));
        self.deliverer.outbound.prune(&registry.allowlists_in_use());
    }

    /// Admits a due entry and queues it on its webhook's slots, or defers, parks or drops it.
    /// An entry that does not reach the slots stops waiting here (`taken`); one that does is
    /// taken when its attempt starts.
    fn dispatch(&mut self, due: Due) -> Result<(), StoreError> {
        let d = &self.deliverer;
        // Checked here so that entries which cannot run take no rate slot, and again when the
        // attempt starts (the job may wait behind its webhook's busy slots).
        let admitted = delivery::admit(&*d.store, &d.registry, &d.shares, due.id, due.token);
        let flight = match admitted {
            Err(err) => {
                d.scheduler.taken();
                return Err(err);
            }
            Ok(Admission::Stale) => {
                d.scheduler.taken();
                return Ok(());
            }
            Ok(Admission::Stopped(stopped)) => {
                d.scheduler.taken();
                let d = d.clone();
                tokio::spawn(async move {
                    if let Err(err) = d.deliveries.stop(stopped).await {
                        tracing::error!(error = %err, "ending a stopped webhook's delivery failed");
                    }
                });
                return Ok(());
            }
            Ok(Admission::Start(flight)) => flight,
        };
        // A fifo webhook's delivery waits (parked, still counted as scheduled) until it is
        // the first open one and nothing else of the webhook runs; before the plan's rate, so
        // a waiting delivery takes no rate slot, and before priority, since order wins.
        if d.registry.fifo().try_start(due) == Gate::Parked {
            return Ok(());
        }
        if !d.claim(due) {
            d.scheduler.taken();
            return Ok(());
        }
        let record = &flight.record;
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
            d.scheduler.taken();
            d.scheduler.schedule(due.id, due.token, when);
            return Ok(());
        }
        // A priority delivery takes the webhook's next free slot: the front of its queue.
        let cap = flight.hook.hook.max_concurrency;
        d.submit(
            due.id.webhook,
            &record.account_id,
            cap,
            Job::Due(due),
            priority,
            due.when,
        );
        Ok(())
    }
}

/// How often push-back learns who waits behind the slots: often enough that a hold ends
/// within a few ms of the wait clearing (`delivery.max_lag` is 20 ms by default).
const SAMPLE_EVERY: Duration = Duration::from_millis(5);

async fn sample_slots(deliverer: Arc<Deliverer>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => if *shutdown.borrow() { return },
            _ = tick.tick() => deliverer.sample_slots(),
        }
    }
}

/// Runs a job, then each job its webhook's freed slot starts, on this task; jobs that other
/// webhooks' may start get tasks of their own.
async fn run_jobs(deliverer: Arc<Deliverer>, first: Start<Job>) {
    let webhook = first.webhook;
    let mut job = first.job;
    loop {
        let ended = match job {
            Job::Due(due) => {
                let ended = deliverer.run_due(due).await;
                deliverer.release(due.id);
                deliverer.registry.fifo().finished(due.id);
                ended
            }
            Job::Test(test) => deliverer.run_test(test).await,
        };
        let mut next = deliverer
            .slots
            .finished(webhook, ended, clock::now_ms(), clock::now_us());
        // Go on with a job of the same webhook, if one may start (its connection is warm).
        let own = next.iter().position(|s| s.webhook == webhook);
        let mine = own.map(|i| next.swap_remove(i));
        for other in next {
            deliverer.start(other);
        }
        match mine {
            Some(start) => {
                deliverer.starting(&start.job);
                job = start.job;
            }
            None => return,
        }
    }
}
