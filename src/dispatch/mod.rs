//! Dispatch: turns due attempts into signed HTTPS requests and records what happened.
//!
//! Due entries arrive from the scheduler over a bounded channel. The [`Dispatcher`] task (the
//! single owner of rate-limit state, per-webhook queues and the in-flight set) checks each
//! against the stored delivery (stale entries are dropped), the webhook's status, and the
//! account's plan rate (a delivery that may not go yet is parked back in the wheel at its own
//! slot). It then takes a per-webhook slot (`delivery.max_in_flight_per_webhook`; a webhook
//! whose slots are all busy queues its deliveries, so one slow endpoint never holds the
//! engine's slots) and a global slot (`delivery.max_in_flight`, a semaphore), and spawns the
//! attempt. [`Deliverer::attempt`] signs and sends the request, and writes the attempt, the
//! delivery's new state and its next schedule entry to the store in one step, then hands any
//! retry back to the scheduler. Failures count towards the webhook's auto-disable.

pub mod client;
pub mod netguard;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::clock;
use crate::config::Config;
use crate::ids::{DeliveryId, WebhookId};
use crate::model::{AttemptRecord, DeliveryRecord, DeliveryStatus, WebhookStatus};
use crate::ratelimit::{Admit, RateLimits};
use crate::registry::{HookEntry, Registry};
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
}

impl Deliverer {
    /// Makes attempt number `record.attempt_count + 1` of `record` to `hook` now, records it,
    /// and schedules the next one if it failed and the schedule allows. Returns the attempt.
    pub async fn attempt(
        &self,
        hook: &HookEntry,
        record: DeliveryRecord,
        body: Bytes,
    ) -> Result<AttemptRecord, StoreError> {
        let number = record.attempt_count + 1;
        let is_test = record.is_test;
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
        self.finish(record, &attempt, success)?;
        if !is_test {
            self.count_outcome(hook.hook.id, success)?;
        }
        Ok(attempt)
    }

    fn finish(
        &self,
        job: DeliveryRecord,
        attempt: &AttemptRecord,
        success: bool,
    ) -> Result<(), StoreError> {
        // Apply the outcome to the stored record, which a manual retry may have changed while
        // the attempt was in flight; a deleted delivery is not brought back.
        let Some(mut record) = self.store.get_delivery(job.id)? else {
            return Ok(());
        };
        let old_due = record.next_attempt_ms;
        let superseded = old_due != job.next_attempt_ms;
        let now = clock::now_ms();
        record.attempt_count = record.attempt_count.max(attempt.number);
        record.response_code = attempt.response_code;
        record.response_time_ms = Some(attempt.response_time_ms);
        record.updated_ms = now;
        if !superseded || success {
            record.note = None;
            if success {
                record.status = DeliveryStatus::Delivered;
                record.next_attempt_ms = None;
            } else if let Some(delay) = (!record.is_test)
                .then(|| self.config.retry_delay(attempt.number))
                .flatten()
            {
                record.status = DeliveryStatus::Retrying;
                record.next_attempt_ms = Some(now + delay.as_millis() as u64);
            } else {
                record.status = DeliveryStatus::Failed;
                record.next_attempt_ms = None;
            }
        }
        self.store.record_attempt(&record, old_due, attempt)?;
        self.registry
            .backlog()
            .track(&record.account_id, old_due, record.next_attempt_ms);
        if record.next_attempt_ms != old_due {
            if let Some(next) = record.next_attempt_ms {
                self.scheduler.schedule(record.id, next, next);
            }
        }
        Ok(())
    }

    /// Consecutive failures per webhook, across deliveries; enough of them disable it.
    fn count_outcome(&self, id: WebhookId, success: bool) -> Result<(), StoreError> {
        let Some(current) = self.registry.hook(id) else {
            return Ok(());
        };
        if success && current.hook.consecutive_failures == 0 {
            return Ok(());
        }
        let _writes = self.registry.write_lock();
        let Some(mut hook) = self.store.get_webhook(&current.hook.account_id, id)? else {
            return Ok(());
        };
        if success {
            hook.consecutive_failures = 0;
        } else {
            hook.consecutive_failures = hook.consecutive_failures.saturating_add(1);
            let limit = self.config.delivery.auto_disable_after;
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
        Ok(())
    }

    /// Ends a delivery whose webhook stopped taking deliveries before its attempt came due.
    fn end_stopped(
        &self,
        mut record: DeliveryRecord,
        status: WebhookStatus,
    ) -> Result<(), StoreError> {
        let old_due = record.next_attempt_ms;
        record.status = DeliveryStatus::Failed;
        record.next_attempt_ms = None;
        record.updated_ms = clock::now_ms();
        record.note = Some(format!(
            "not attempted: the webhook was {} when the attempt came due; retry it by hand once the webhook is active",
            status.as_str()
        ));
        self.store.update_delivery(&record, old_due)?;
        self.registry
            .backlog()
            .track(&record.account_id, old_due, None);
        Ok(())
    }
}

/// What became of a due entry: finished with (attempt started, or nothing to do), or queued
/// behind its webhook's busy slots (still waiting, so still counted as scheduled).
enum Dispatched {
    Done,
    Queued,
}

struct Job {
    record: DeliveryRecord,
    hook: Arc<HookEntry>,
}

/// A webhook's slots: its semaphore and the deliveries waiting for one of them.
struct HookSlots {
    permits: Arc<Semaphore>,
    waiting: Mutex<VecDeque<Job>>,
}

pub struct Dispatcher {
    deliverer: Arc<Deliverer>,
    limits: RateLimits,
    slots: HashMap<WebhookId, Arc<HookSlots>>,
    in_flight: Arc<Mutex<HashSet<DeliveryId>>>,
}

impl Dispatcher {
    pub fn new(deliverer: Arc<Deliverer>) -> Self {
        Dispatcher {
            deliverer,
            limits: RateLimits::new(),
            slots: HashMap::new(),
            in_flight: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    pub async fn run(mut self, mut due: mpsc::Receiver<Due>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { break } else { continue }
                }
                next = due.recv() => next,
            };
            let Some(next) = next else { break };
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
        let Some(record) = d.store.get_delivery(due.id)? else {
            return Ok(Dispatched::Done);
        };
        if record.next_attempt_ms != Some(due.token) || !record.status.is_open() {
            return Ok(Dispatched::Done);
        }
        if self.in_flight_contains(due.id) {
            return Ok(Dispatched::Done);
        }
        let Some(hook) = d.registry.hook(due.id.webhook) else {
            return Ok(Dispatched::Done);
        };
        if hook.hook.status != WebhookStatus::Active {
            d.end_stopped(record, hook.hook.status)?;
            return Ok(Dispatched::Done);
        }
        let per_second = d
            .registry
            .plan_of(&record.account_id)
            .and_then(|p| d.config.plans.get(&p).map(|p| p.events_per_second))
            .unwrap_or(0);
        if let Admit::At(when) = self.limits.admit(&record.account_id, per_second) {
            metrics::counter!("kyberhook_rate_limit_deferrals_total").increment(1);
            d.scheduler.schedule(due.id, due.token, when);
            return Ok(Dispatched::Done);
        }
        let per_hook = d.config.delivery.max_in_flight_per_webhook;
        let slots = self
            .slots
            .entry(due.id.webhook)
            .or_insert_with(|| {
                Arc::new(HookSlots {
                    permits: Arc::new(Semaphore::new(per_hook)),
                    waiting: Mutex::new(VecDeque::new()),
                })
            })
            .clone();
        self.in_flight_insert(due.id);
        let job = Job { record, hook };
        let hook_permit = {
            let mut waiting = slots.waiting.lock().unwrap_or_else(|p| p.into_inner());
            match slots.permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    waiting.push_back(job);
                    return Ok(Dispatched::Queued);
                }
            }
        };
        let global = d
            .global
            .clone()
            .acquire_owned()
            .await
            .expect("the global semaphore is never closed");
        tokio::spawn(run_attempts(
            self.deliverer.clone(),
            job,
            slots,
            hook_permit,
            global,
            self.in_flight.clone(),
        ));
        Ok(Dispatched::Done)
    }

    fn in_flight_contains(&self, id: DeliveryId) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    fn in_flight_insert(&self, id: DeliveryId) {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
    }
}

/// Runs a job, then whatever queued for the same webhook meanwhile, keeping both slots.
async fn run_attempts(
    deliverer: Arc<Deliverer>,
    mut job: Job,
    slots: Arc<HookSlots>,
    hook_permit: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
    in_flight: Arc<Mutex<HashSet<DeliveryId>>>,
) {
    loop {
        let id = job.record.id;
        let result = match deliverer.store.get_event(id.seq) {
            Ok(Some(event)) => {
                // Secrets may have rotated and URLs changed since the job was queued.
                let hook = deliverer.registry.hook(id.webhook).unwrap_or(job.hook);
                deliverer
                    .attempt(&hook, job.record, Bytes::from(event.body))
                    .await
                    .map(|_| ())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(err) = result {
            tracing::error!(delivery = %id, error = %err, "recording an attempt failed");
        }
        in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let mut waiting = slots.waiting.lock().unwrap_or_else(|p| p.into_inner());
        match waiting.pop_front() {
            Some(next) => {
                deliverer.scheduler.taken();
                job = next;
            }
            None => {
                // Released under the queue lock, so the dispatcher never queues a job behind
                // a slot that is being given back.
                drop(hook_permit);
                return;
            }
        }
    }
}
