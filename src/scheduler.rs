//! The scheduler: the one task that owns the timing wheel holding every future attempt.
//!
//! Entries come in over [`SchedulerHandle::schedule`] — first attempts, retries and manual
//! retries from the delivery writer once they are written, rate-limit deferrals and parked
//! retries from the dispatcher — and, at
//! start-up, from the store's `schedule` tree (so nothing scheduled is lost by a restart).
//! The task sleeps until the wheel's next deadline (one timer, re-armed whenever an earlier
//! entry arrives), then hands due entries to the dispatcher over a bounded channel.
//!
//! Each entry carries a *token*: the delivery's `next_attempt_ms` when it was scheduled. The
//! dispatcher acts on an entry only if the stored record still has that token, so a superseded
//! entry (the delivery was retried by hand, deleted, or already attempted) is dropped when it
//! fires rather than searched for and cancelled. Duplicate entries (a delivery scheduled by
//! start-up fan-out and by the read of `schedule`) are harmless for the same reason: the
//! token check and the dispatcher's in-flight map let only one attempt through.
//!
//! At start-up the whole `schedule` tree is read back before the engine reports ready
//! (`/readyz`, and systemd's `READY=1` through [`SchedulerHandle::wait_ready`]); overdue
//! entries fire at once, and the per-webhook slots keep them from stampeding one endpoint.
//!
//! The input channel is unbounded on purpose: the dispatcher sends retries here while this
//! task may be waiting for room in the dispatcher's channel, and a bounded channel both ways
//! could deadlock. Its size is bounded upstream instead: ingest refuses new events (503) while
//! more than `delivery.max_scheduled` deliveries wait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, watch, Notify};

use crate::clock;
use crate::ids::DeliveryId;
use crate::pushback::Lag;
use crate::store::Storage;
use crate::wheel::Wheel;

/// How many due entries are moved out of the wheel per step.
const CHUNK: usize = 1024;

/// A due attempt, handed to the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub id: DeliveryId,
    pub token: u64,
    /// When it was due (unix ms): its token, or later for a rate-limit deferral. How late the
    /// dispatcher takes it is the engine's own delay ([`crate::pushback`]).
    pub when: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    when: u64,
    due: Due,
}

#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Entry>,
    scheduled: Arc<AtomicUsize>,
    ready: Arc<AtomicBool>,
    /// Wakes [`SchedulerHandle::wait_ready`] when `ready` is set.
    ready_notify: Arc<Notify>,
    /// The engine's delivery lag ([`crate::pushback`]); the scheduler publishes its part.
    lag: Arc<Lag>,
}

impl SchedulerHandle {
    /// Schedules an attempt of `id` at unix ms `when`; `token` is the record's
    /// `next_attempt_ms` that the attempt must still find when it fires.
    pub fn schedule(&self, id: DeliveryId, token: u64, when: u64) {
        self.scheduled.fetch_add(1, Ordering::Relaxed);
        if self
            .tx
            .send(Entry {
                when,
                due: Due { id, token, when },
            })
            .is_err()
        {
            // Shutting down: the entry is in the store's schedule tree and comes back at start.
            self.scheduled.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// An entry handed out by the scheduler stopped waiting: its attempt started, or it was
    /// dropped as stale, or re-scheduled (which counts it again).
    pub fn taken(&self) {
        self.scheduled.fetch_sub(1, Ordering::Relaxed);
    }

    /// Deliveries waiting for an attempt: in the wheel, on their way to the dispatcher, or
    /// queued behind a busy webhook.
    pub fn scheduled(&self) -> usize {
        self.scheduled.load(Ordering::Relaxed)
    }

    /// The engine's delivery lag, which ingest reads for its push-back.
    pub fn lag(&self) -> &Arc<Lag> {
        &self.lag
    }

    /// Whether start-up recovery has loaded the stored schedule.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Returns once start-up recovery has loaded the stored schedule (systemd's readiness).
    pub async fn wait_ready(&self) {
        loop {
            // Registered before the check, so a wake-up between the two is not lost.
            let notified = self.ready_notify.notified();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }
}

pub struct Scheduler {
    rx: mpsc::UnboundedReceiver<Entry>,
    out: mpsc::Sender<Due>,
    scheduled: Arc<AtomicUsize>,
    ready: Arc<AtomicBool>,
    ready_notify: Arc<Notify>,
    lag: Arc<Lag>,
}

impl Scheduler {
    /// A scheduler and its handle; due entries leave through `out`.
    pub fn new(out: mpsc::Sender<Due>) -> (Scheduler, SchedulerHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let scheduled = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let ready_notify = Arc::new(Notify::new());
        let lag = Arc::new(Lag::default());
        let handle = SchedulerHandle {
            tx,
            scheduled: scheduled.clone(),
            ready: ready.clone(),
            ready_notify: ready_notify.clone(),
            lag: lag.clone(),
        };
        (
            Scheduler {
                rx,
                out,
                scheduled,
                ready,
                ready_notify,
                lag,
            },
            handle,
        )
    }

    /// Loads the stored schedule (if any), then runs until `shutdown` turns true.
    pub async fn run(
        mut self,
        store: Option<Arc<dyn Storage>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut wheel: Wheel<Due> = Wheel::new(clock::now_ms());
        if let Some(store) = store {
            let started = std::time::Instant::now();
            let loaded = tokio::task::spawn_blocking(move || {
                store.scheduled().collect::<Result<Vec<_>, _>>()
            })
            .await;
            match loaded {
                Ok(Ok(entries)) => {
                    let now = clock::now_ms();
                    wheel = Wheel::with_capacity(now, entries.len());
                    for (due, id) in &entries {
                        // Overdue entries count as due now: time spent stopped is not the
                        // running engine's lag.
                        let when = (*due).max(now);
                        wheel.insert(
                            when,
                            Due {
                                id: *id,
                                token: *due,
                                when,
                            },
                        );
                    }
                    self.scheduled.fetch_add(entries.len(), Ordering::Relaxed);
                    tracing::info!(
                        entries = entries.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "schedule recovered"
                    );
                }
                Ok(Err(err)) => tracing::error!(error = %err, "reading the stored schedule failed"),
                Err(err) => tracing::error!(error = %err, "schedule recovery task failed"),
            }
        }
        self.ready.store(true, Ordering::Release);
        self.ready_notify.notify_waiters();

        let mut ready: VecDeque<Due> = VecDeque::new();
        let mut fired: Vec<(u64, Due)> = Vec::with_capacity(CHUNK);
        loop {
            if ready.is_empty() {
                fired.clear();
                wheel.poll_at_most(clock::now_ms(), CHUNK, &mut fired);
                ready.extend(fired.drain(..).map(|(_, d)| d));
            }
            let next = if ready.is_empty() {
                wheel.next_deadline()
            } else {
                None
            };
            self.lag.dispatch_waiting(ready.front().map(|d| d.when));
            metrics::gauge!("kyberhook_deliveries_scheduled")
                .set(self.scheduled.load(Ordering::Relaxed) as f64);
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        break;
                    }
                }
                entry = self.rx.recv() => {
                    let Some(entry) = entry else { break };
                    wheel.insert(entry.when, entry.due);
                    for _ in 0..CHUNK {
                        match self.rx.try_recv() {
                            Ok(e) => { wheel.insert(e.when, e.due); }
                            Err(_) => break,
                        }
                    }
                }
                permit = self.out.reserve(), if !ready.is_empty() => {
                    let Ok(permit) = permit else { break };
                    if let Some(due) = ready.pop_front() {
                        permit.send(due);
                    }
                    while let Some(due) = ready.front().copied() {
                        match self.out.try_reserve() {
                            Ok(p) => {
                                p.send(due);
                                ready.pop_front();
                            }
                            Err(_) => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(clock::instant_at(next.unwrap_or(0))), if next.is_some() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::WebhookId;

    fn id(n: u64) -> DeliveryId {
        DeliveryId {
            seq: n,
            webhook: WebhookId(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fires_in_deadline_order_at_the_right_virtual_time() {
        let (out_tx, mut out_rx) = mpsc::channel(16);
        let (sched, handle) = Scheduler::new(out_tx);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(sched.run(None, stop_rx));
        let t0 = clock::now_ms();
        handle.schedule(id(3), 3, t0 + 3_600_000);
        handle.schedule(id(1), 1, t0 + 500);
        handle.schedule(id(2), 2, t0 + 60_000);
        assert_eq!(handle.scheduled(), 3);

        let first = out_rx.recv().await.unwrap();
        assert_eq!(first.id, id(1));
        let at = clock::now_ms() - t0;
        assert!((500..=501).contains(&at), "fired at +{at} ms");

        let second = out_rx.recv().await.unwrap();
        assert_eq!(second.id, id(2));
        assert!((60_000..=60_001).contains(&(clock::now_ms() - t0)));

        // An earlier entry inserted while the task sleeps towards a later one re-arms the timer.
        handle.schedule(id(4), 4, clock::now_ms() + 10);
        let third = out_rx.recv().await.unwrap();
        assert_eq!(third.id, id(4));
        let fourth = out_rx.recv().await.unwrap();
        assert_eq!(
            fourth,
            Due {
                id: id(3),
                token: 3,
                when: t0 + 3_600_000,
            }
        );
        assert!((3_600_000..=3_600_001).contains(&(clock::now_ms() - t0)));
        // Counted until the dispatcher says the attempts started.
        assert_eq!(handle.scheduled(), 4);
        for _ in 0..4 {
            handle.taken();
        }
        assert_eq!(handle.scheduled(), 0);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn past_deadlines_fire_at_once_and_a_full_dispatcher_holds_entries() {
        let (out_tx, mut out_rx) = mpsc::channel(1);
        let (sched, handle) = Scheduler::new(out_tx);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(sched.run(None, stop_rx));
        for n in 0..5 {
            handle.schedule(id(n), n, 0);
        }
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(out_rx.recv().await.unwrap().id.seq);
        }
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        task.abort();
    }
}
