//! Slots: which waiting attempt runs next, and how many run at once.
//!
//! Every attempt holds one of the engine's slots (`delivery.max_in_flight`) and counts
//! against its webhook's adaptive limit ([`Controller`]). The dispatcher [`Slots::submit`]s
//! each admitted job to its webhook's queue (test sends and priority deliveries to a queue
//! ahead of it); whoever frees a slot ([`Slots::finished`]) gets back the jobs that may start
//! now. One mutex guards the whole pool: it is held for a few hash-map and deque operations
//! per attempt, never across an await.
//!
//! **Fair shares.** Webhooks that have waiting jobs and room under their own limit wait in one
//! round-robin line for engine slots. A freed slot goes to the first of them that holds fewer
//! than its fair share (`max_in_flight` / webhooks busy); only when none is below its share
//! does the line's head get it. So a webhook whose limit has grown to hundreds cannot keep
//! the engine's slots from one that just started waiting, and no slot idles while work waits.
//!
//! **Whose wait is it.** [`Slots::sample`] (the dispatcher calls it every 5 ms) reports, per
//! account, the oldest job waiting *because of the engine*: for an engine slot, or behind its
//! webhook's limit while the endpoint is not holding that limit down
//! ([`Controller::held_down`]: no refusal in the last 2 s, and the customer's cap not the
//! binding one). Push-back holds that account's ingest on it (`pushback::Lag`), so account B
//! is never held for account A's endpoint, and account A's producers slow to what its endpoint
//! takes while the limit is still growing toward it. A wait behind an endpoint that refuses,
//! or behind the customer's own cap, is the endpoint's backlog: it is shown (per webhook as
//! `backlog` in the JSON view, and as `kyberhook_webhook_backlog_oldest_seconds`) but holds
//! nobody's ingest; the account's quota (`delivery.max_scheduled_per_account`) bounds it.
//! Why a slow but answering endpoint still counts as the engine's wait: see `pushback`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use super::concurrency::{Controller, Signal};
use crate::ids::{AccountId, WebhookId};

/// A webhook's limit starts here (the fixed cap before limits adapted, so no endpoint does
/// worse than it did) and adapts from there.
pub const INITIAL_LIMIT: u32 = 64;

/// A webhook idle this long loses its controller's state (and a deleted webhook's goes).
const FORGET_IDLE: Duration = Duration::from_secs(60);
/// How often [`Slots::sample`] looks for idle webhooks (a scan of all it knows).
const PRUNE_EVERY_MS: u64 = 1_000;

/// A job for a webhook's slots.
pub struct Queued<'a, J> {
    pub webhook: WebhookId,
    pub account: &'a AccountId,
    /// The webhook's own `max_concurrency`.
    pub cap: Option<u32>,
    pub job: J,
    /// Test sends and priority deliveries go ahead of the webhook's queue.
    pub urgent: bool,
    /// When it was due (unix ms): how long it waits counts from here.
    pub since_ms: u64,
}

/// A job that may start now, on a slot already taken for it.
#[derive(Debug)]
pub struct Start<J> {
    pub webhook: WebhookId,
    pub job: J,
}

/// How an attempt ended, for its webhook's limit: what the outcome said about the endpoint,
/// how long it took, and the webhook's `max_concurrency` as the attempt found it (`None`:
/// not known — no attempt was made).
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    pub signal: Signal,
    pub rtt: Duration,
    pub cap: Option<Option<u32>>,
}

impl Ended {
    /// A job that made no attempt (stale, stopped, its event gone).
    pub const NOTHING: Ended = Ended {
        signal: Signal::Neutral,
        rtt: Duration::ZERO,
        cap: None,
    };
}

/// What the dashboard and the API show of a webhook's slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookView {
    pub limit: u32,
    pub in_flight: u32,
    pub waiting: usize,
    /// How long the oldest waiting job has waited (ms), if any waits.
    pub oldest_waiting_ms: Option<u64>,
}

/// One sample of who waits ([`Slots::sample`]).
#[derive(Debug, Default)]
pub struct Sample {
    /// Per account, the due time (unix ms) of its oldest job waiting because of the engine.
    pub engine_waits: HashMap<AccountId, u64>,
    /// The due time of the oldest waiting job of any webhook, for any reason.
    pub oldest_ms: Option<u64>,
    /// Attempts in flight, engine-wide.
    pub in_flight: u32,
}

struct Waiting<J> {
    job: J,
    /// When it was due (unix ms): its age is how long it has waited.
    since_ms: u64,
}

struct Hook<J> {
    account: AccountId,
    controller: Controller,
    /// Whether the ceiling is the webhook's own `max_concurrency` (lower than the engine's).
    customer_cap: bool,
    /// Test sends and priority deliveries: before `queue`.
    urgent: VecDeque<Waiting<J>>,
    queue: VecDeque<Waiting<J>>,
    /// In the line for engine slots.
    in_line: bool,
    last_active_ms: u64,
}

impl<J> Hook<J> {
    /// The webhook's own `max_concurrency` as it is now, under the engine's `ceiling`.
    fn set_cap(&mut self, cap: Option<u32>, ceiling: u32) {
        let own = cap.map_or(ceiling, |c| c.min(ceiling));
        if own != self.controller.ceiling() {
            self.controller.set_ceiling(own);
        }
        self.customer_cap = own < ceiling;
    }

    fn waiting(&self) -> usize {
        self.urgent.len() + self.queue.len()
    }

    fn oldest_since(&self) -> Option<u64> {
        match (self.urgent.front(), self.queue.front()) {
            (Some(a), Some(b)) => Some(a.since_ms.min(b.since_ms)),
            (a, b) => a.or(b).map(|w| w.since_ms),
        }
    }

    fn busy(&self) -> bool {
        self.controller.in_flight() > 0 || self.waiting() > 0
    }
}

struct Pool<J> {
    total: u32,
    in_flight: u32,
    /// The engine's ceiling per webhook (`delivery.max_in_flight_per_webhook`).
    ceiling: u32,
    hooks: HashMap<WebhookId, Hook<J>>,
    /// Webhooks with waiting jobs and room under their limit, in turn order.
    line: VecDeque<WebhookId>,
    /// Webhooks with jobs waiting: what a sample looks at.
    waiting: HashSet<WebhookId>,
    /// Webhooks with work in flight or waiting (the fair share divides by it).
    busy: u32,
    last_prune_ms: u64,
    closing: bool,
}

/// The engine's slots and every webhook's queue and limit.
pub struct Slots<J> {
    pool: Mutex<Pool<J>>,
    /// Wakes [`Slots::drained`] when the last attempt ends.
    idle: Notify,
}

impl<J> Slots<J> {
    /// `total` engine slots; each webhook's limit adapts up to `ceiling`.
    pub fn new(total: usize, ceiling: usize) -> Slots<J> {
        Slots {
            pool: Mutex::new(Pool {
                total: total.max(1) as u32,
                in_flight: 0,
                ceiling: ceiling.max(1) as u32,
                hooks: HashMap::new(),
                line: VecDeque::new(),
                waiting: HashSet::new(),
                busy: 0,
                last_prune_ms: 0,
                closing: false,
            }),
            idle: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool<J>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job on its webhook (see [`Queued`]). Returns the jobs that may start now —
    /// this one among them when a slot was free.
    pub fn submit(&self, queued: Queued<'_, J>, now_ms: u64) -> Vec<Start<J>> {
        let Queued {
            webhook,
            account,
            cap,
            job,
            urgent,
            since_ms,
        } = queued;
        let mut pool = self.lock();
        let pool = &mut *pool;
        let ceiling = pool.ceiling;
        let hook = pool.hooks.entry(webhook).or_insert_with(|| Hook {
            account: account.clone(),
            controller: Controller::new(INITIAL_LIMIT, ceiling),
            customer_cap: false,
            urgent: VecDeque::new(),
            queue: VecDeque::new(),
            in_line: false,
            last_active_ms: now_ms,
        });
        hook.set_cap(cap, ceiling);
        hook.last_active_ms = now_ms;
        if !hook.busy() {
            pool.busy += 1;
        }
        if hook.waiting() == 0 {
            pool.waiting.insert(webhook);
        }
        let waiting = Waiting { job, since_ms };
        if urgent {
            hook.urgent.push_back(waiting);
        } else {
            hook.queue.push_back(waiting);
        }
        if !hook.in_line && hook.controller.has_room() {
            hook.in_line = true;
            pool.line.push_back(webhook);
        }
        let mut out = Vec::new();
        pool.fill(&mut out);
        out
    }

    /// An attempt of `webhook` ended (`signal` and `rtt` from its outcome; a job that made no
    /// attempt ends with [`Signal::Neutral`]). Frees its slots and returns what may start.
    pub fn finished(
        &self,
        webhook: WebhookId,
        ended: Ended,
        now_ms: u64,
        now_us: u64,
    ) -> Vec<Start<J>> {
        let mut pool = self.lock();
        pool.in_flight = pool.in_flight.saturating_sub(1);
        let pool = &mut *pool;
        let ceiling = pool.ceiling;
        if let Some(hook) = pool.hooks.get_mut(&webhook) {
            if let Some(cap) = ended.cap {
                hook.set_cap(cap, ceiling);
            }
            hook.controller.finished(ended.signal, ended.rtt, now_us);
            hook.last_active_ms = now_ms;
            if !hook.busy() {
                pool.busy = pool.busy.saturating_sub(1);
            }
            if !hook.in_line && hook.waiting() > 0 && hook.controller.has_room() {
                hook.in_line = true;
                pool.line.push_back(webhook);
            }
        }
        let mut out = Vec::new();
        pool.fill(&mut out);
        if pool.in_flight == 0 {
            self.idle.notify_waiters();
        }
        out
    }

    /// What `webhook`'s slots look like at `now_ms` (its limit before it ever ran: the
    /// initial one, under `cap`).
    pub fn view(&self, webhook: WebhookId, cap: Option<u32>, now_ms: u64) -> HookView {
        let pool = self.lock();
        match pool.hooks.get(&webhook) {
            Some(h) => HookView {
                limit: h.controller.limit(),
                in_flight: h.controller.in_flight(),
                waiting: h.waiting(),
                oldest_waiting_ms: h.oldest_since().map(|s| now_ms.saturating_sub(s)),
            },
            None => HookView {
                limit: INITIAL_LIMIT
                    .min(pool.ceiling)
                    .min(cap.unwrap_or(u32::MAX))
                    .max(1),
                in_flight: 0,
                waiting: 0,
                oldest_waiting_ms: None,
            },
        }
    }

    /// Who waits, and why (see the module docs); also forgets webhooks idle for
    /// [`FORGET_IDLE`] and refreshes the count of busy webhooks the fair share divides by.
    pub fn sample(&self, now_ms: u64, now_us: u64) -> Sample {
        let mut pool = self.lock();
        let pool = &mut *pool;
        let mut sample = Sample {
            in_flight: pool.in_flight,
            ..Sample::default()
        };
        if now_ms >= pool.last_prune_ms + PRUNE_EVERY_MS {
            pool.last_prune_ms = now_ms;
            let idle_before = now_ms.saturating_sub(FORGET_IDLE.as_millis() as u64);
            pool.hooks
                .retain(|_, h| h.busy() || h.last_active_ms >= idle_before);
        }
        for id in &pool.waiting {
            let Some(hook) = pool.hooks.get(id) else {
                continue;
            };
            let Some(since) = hook.oldest_since() else {
                continue;
            };
            sample.oldest_ms = Some(sample.oldest_ms.map_or(since, |o| o.min(since)));
            let endpoints_doing =
                !hook.controller.has_room() && hook.controller.held_down(now_us, hook.customer_cap);
            if !endpoints_doing {
                let e = sample
                    .engine_waits
                    .entry(hook.account.clone())
                    .or_insert(since);
                *e = (*e).min(since);
            }
        }
        sample
    }

    /// Stops starting jobs (shutdown): what still waits is dropped — scheduled deliveries
    /// come back from the store at the next start.
    pub fn close(&self) {
        let mut pool = self.lock();
        pool.closing = true;
        pool.line.clear();
        pool.waiting.clear();
        for hook in pool.hooks.values_mut() {
            hook.urgent.clear();
            hook.queue.clear();
            hook.in_line = false;
        }
    }

    /// Returns once no attempt is in flight.
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            if self.lock().in_flight == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Attempts in flight, engine-wide.
    pub fn in_flight(&self) -> u32 {
        self.lock().in_flight
    }
}

impl<J> Pool<J> {
    /// Hands free engine slots to waiting jobs, in turn (see the module docs).
    fn fill(&mut self, out: &mut Vec<Start<J>>) {
        while !self.closing && self.in_flight < self.total && !self.line.is_empty() {
            let share = (self.total / self.busy.max(1)).max(1);
            let hooks = &self.hooks;
            let at = self
                .line
                .iter()
                .position(|id| {
                    hooks
                        .get(id)
                        .is_some_and(|h| h.controller.in_flight() < share)
                })
                .unwrap_or(0);
            let Some(id) = self.line.remove(at) else {
                break;
            };
            let Some(hook) = self.hooks.get_mut(&id) else {
                continue;
            };
            hook.in_line = false;
            let Some(next) = hook.urgent.pop_front().or_else(|| hook.queue.pop_front()) else {
                continue;
            };
            if hook.waiting() == 0 {
                self.waiting.remove(&id);
            }
            hook.controller.started();
            self.in_flight += 1;
            if hook.waiting() > 0 && hook.controller.has_room() {
                hook.in_line = true;
                self.line.push_back(id);
            }
            out.push(Start {
                webhook: id,
                job: next.job,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::WebhookId;

    fn hook(n: u64) -> WebhookId {
        WebhookId(n)
    }

    fn acc(s: &str) -> AccountId {
        AccountId::parse(s).unwrap()
    }

    fn ended(signal: Signal, rtt: Duration) -> Ended {
        Ended {
            signal,
            rtt,
            cap: None,
        }
    }

    fn queued(
        h: u64,
        account: &AccountId,
        cap: Option<u32>,
        job: u32,
        urgent: bool,
    ) -> Queued<'_, u32> {
        Queued {
            webhook: hook(h),
            account,
            cap,
            job,
            urgent,
            since_ms: 1_000,
        }
    }

    fn submit(s: &Slots<u32>, h: u64, a: &str, job: u32) -> Vec<u32> {
        s.submit(queued(h, &acc(a), None, job, false), 1_000)
            .into_iter()
            .map(|s| s.job)
            .collect()
    }

    #[test]
    fn jobs_start_while_slots_are_free_then_wait_in_order() {
        let s: Slots<u32> = Slots::new(2, 512);
        assert_eq!(submit(&s, 1, "acme", 1), vec![1]);
        assert_eq!(submit(&s, 1, "acme", 2), vec![2]);
        assert!(submit(&s, 1, "acme", 3).is_empty(), "no engine slot left");
        assert!(submit(&s, 1, "acme", 4).is_empty());
        let next = s.finished(
            hook(1),
            ended(Signal::Success, Duration::from_millis(1)),
            1_001,
            1,
        );
        assert_eq!(next.iter().map(|s| s.job).collect::<Vec<_>>(), vec![3]);
        assert_eq!(s.view(hook(1), None, 1_500).waiting, 1);
        assert_eq!(s.view(hook(1), None, 1_500).oldest_waiting_ms, Some(500));
    }

    #[test]
    fn urgent_jobs_go_first() {
        let s: Slots<u32> = Slots::new(1, 512);
        submit(&s, 1, "acme", 1);
        submit(&s, 1, "acme", 2);
        s.submit(queued(1, &acc("acme"), None, 99, true), 1_000);
        let next = s.finished(
            hook(1),
            ended(Signal::Success, Duration::from_millis(1)),
            1_001,
            1,
        );
        assert_eq!(next[0].job, 99);
    }

    #[test]
    fn a_webhook_with_a_high_limit_cannot_keep_the_engine_slots_from_another() {
        let s: Slots<u32> = Slots::new(8, 512);
        // Webhook 1 takes every engine slot and has more waiting.
        for j in 0..20 {
            submit(&s, 1, "acme", j);
        }
        assert_eq!(s.in_flight(), 8);
        // Webhook 2 starts waiting; the share is refreshed by the sampler.
        submit(&s, 2, "globex", 100);
        submit(&s, 2, "globex", 101);
        s.sample(1_000, 1);
        // Each slot webhook 1 frees goes to webhook 2 until it holds its share (4 of 8).
        let mut to_two = 0;
        for _ in 0..2 {
            for st in s.finished(
                hook(1),
                ended(Signal::Success, Duration::from_millis(1)),
                1_001,
                1,
            ) {
                if st.webhook == hook(2) {
                    to_two += 1;
                }
            }
        }
        assert_eq!(to_two, 2, "webhook 2 waited behind webhook 1's backlog");
    }

    #[test]
    fn no_slot_idles_while_work_waits() {
        let s: Slots<u32> = Slots::new(4, 512);
        for j in 0..10 {
            submit(&s, 1, "acme", j);
        }
        s.sample(1_000, 1);
        // Only webhook 1 has work: it may use every engine slot, over any share.
        assert_eq!(s.in_flight(), 4);
    }

    #[test]
    fn a_customer_cap_binds_and_its_waits_are_the_customers() {
        let s: Slots<u32> = Slots::new(100, 512);
        for j in 0..5 {
            s.submit(queued(1, &acc("acme"), Some(2), j, false), 1_000);
        }
        assert_eq!(s.in_flight(), 2);
        let v = s.view(hook(1), Some(2), 1_000);
        assert_eq!((v.limit, v.waiting), (2, 3));
        let sample = s.sample(1_200, 200_000);
        assert!(sample.engine_waits.is_empty(), "{sample:?}");
        assert_eq!(sample.oldest_ms, Some(1_000));
    }

    #[test]
    fn waits_behind_a_healthy_endpoint_are_the_engines_and_behind_a_refusing_one_are_not() {
        let s: Slots<u32> = Slots::new(1_000, 512);
        // Fill webhook 1's initial limit and queue more.
        for j in 0..(INITIAL_LIMIT + 5) {
            submit(&s, 1, "acme", j);
        }
        let sample = s.sample(1_100, 100_000);
        assert_eq!(sample.engine_waits.get(&acc("acme")), Some(&1_000));
        // The endpoint answers 503s: now its limit is held down by the endpoint.
        for _ in 0..10 {
            s.finished(
                hook(1),
                ended(Signal::BackPressure, Duration::ZERO),
                1_100,
                100_000,
            );
        }
        for j in 0..50 {
            submit(&s, 1, "acme", 1_000 + j);
        }
        let sample = s.sample(1_200, 200_000);
        assert!(sample.engine_waits.is_empty(), "{sample:?}");
        assert_eq!(sample.oldest_ms, Some(1_000));
    }

    #[test]
    fn waiting_for_an_engine_slot_is_the_engines_wait() {
        let s: Slots<u32> = Slots::new(1, 512);
        submit(&s, 1, "acme", 1);
        submit(&s, 2, "globex", 2);
        let sample = s.sample(1_050, 50_000);
        assert_eq!(sample.engine_waits.get(&acc("globex")), Some(&1_000));
        assert!(!sample.engine_waits.contains_key(&acc("acme")));
    }

    #[tokio::test]
    async fn close_drops_waiting_jobs_and_drained_waits_for_the_rest() {
        let s: std::sync::Arc<Slots<u32>> = std::sync::Arc::new(Slots::new(1, 512));
        submit(&s, 1, "acme", 1);
        submit(&s, 1, "acme", 2);
        s.close();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.drained().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let next = s.finished(hook(1), ended(Signal::Success, Duration::ZERO), 1_001, 1);
        assert!(next.is_empty(), "nothing starts after close");
        waiter.await.unwrap();
    }

    #[test]
    fn idle_webhooks_are_forgotten() {
        let s: Slots<u32> = Slots::new(4, 512);
        submit(&s, 1, "acme", 1);
        s.finished(hook(1), ended(Signal::Success, Duration::ZERO), 1_000, 1);
        s.sample(2_000, 1);
        assert_eq!(s.lock().hooks.len(), 1, "kept through a short idle gap");
        assert_eq!(s.lock().busy, 0);
        s.sample(1_000 + FORGET_IDLE.as_millis() as u64 + 1, 1);
        assert!(s.lock().hooks.is_empty());
    }
}
