//! Delivery: every state transition of a delivery, and the one thread that writes them.
//!
//! A delivery moves through typed stages. It is created (fan-out, a test send) with a schedule
//! entry whose *token* is its `next_attempt_ms`; when the entry comes due, [`admit`] checks it
//! against the stored record and the webhook's current state *at the moment the attempt would
//! start* and answers [`Admission::Start`] with an [`InFlight`], [`Admission::Stopped`] (the
//! webhook was paused or disabled) or [`Admission::Stale`] (superseded, deleted). The outcome of
//! the attempt is [`settle`]d into a [`Settled`] stage — delivered, retrying at a time, failed,
//! or waiting for a manual retry that came in meanwhile. The token rules — which time an entry
//! carries, when an entry is superseded — are all in this file ([`retry_token`], [`settle`]).
//!
//! Reads happen anywhere; **writes happen on one thread**, the delivery writer. Every change —
//! create, outcome, manual retry, recover, stop, forgetting a webhook's or account's deliveries,
//! purging those past retention — is a
//! [`Command`] sent over a bounded crossbeam channel. The writer blocks for one command, drains
//! what else is queued, applies them in order against an in-memory overlay (so a retry and an
//! outcome of one delivery in the same drain see each other), writes the whole drain tree by
//! tree in crash-safe order ([`Store::apply_delivery_writes`]), and only then
//! answers each caller over its oneshot channel and hands new schedule entries to the
//! scheduler. Because one thread applies every read-modify-write of a delivery record, a manual
//! retry and an attempt's outcome never overwrite each other, and nothing on the async runtime
//! waits for a delivery write. Webhook failure counts (auto-disable) are updated here too,
//! after the drain's write.
//!
//! Deliveries that fan-out creates are **held** rather than written ([`HELD_WINDOW`], see
//! `store::unwritten`): their first attempts are scheduled at once, and a delivery whose
//! first attempt settles within the window is written once, settled, with no schedule entry
//! written and removed for it. What is still held when the window ends is written as created.
//! Fan-out hears that a batch is written only then, so the events' inbox marks (which re-run
//! fan-out after a crash) stand until every delivery of theirs is on the store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use tokio::sync::oneshot;

use crate::clock;
use crate::config::Config;
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{
    Account, AttemptRecord, DeliveryRecord, DeliveryStatus, Webhook, WebhookStatus,
};
use crate::registry::{HookEntry, Registry};
use crate::scheduler::SchedulerHandle;
use crate::store::{DeliveryWrites, PurgePlan, PurgedBatch, Store, StoreError};

/// Commands waiting for the writer; a full queue makes async callers wait off the runtime.
const QUEUE: usize = 8192;
/// Most commands one drain applies (bounds the latency one drain adds).
const MAX_DRAIN: usize = 4096;
/// How long a delivery fan-out created is held unwritten, waiting for its first attempt to
/// settle. Long enough for an attempt that queued behind busy slots under load (the load
/// bench's 10-webhook phases see p99 of ~0.5 s from commit to arrival), short enough that the
/// delivery log shows a slow attempt's delivery as pending soon after its event.
pub const HELD_WINDOW: Duration = Duration::from_secs(1);
/// Most deliveries held at once; beyond it the oldest are written early (bounds memory when
/// attempts stop settling, e.g. every endpoint hangs).
const HELD_MAX: usize = 65_536;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    #[error("{0}")]
    Store(String),
    #[error("the delivery writer has stopped")]
    Closed,
}

impl From<StoreError> for DeliveryError {
    fn from(e: StoreError) -> Self {
        DeliveryError::Store(e.to_string())
    }
}

// ---- stages ----

/// What a due schedule entry turned out to be when its attempt was about to start.
pub enum Admission {
    /// The record still carries the entry's token and the webhook is active: attempt it.
    Start(InFlight),
    /// The webhook stopped taking deliveries (paused, disabled): end the delivery.
    Stopped(Stopped),
    /// Superseded (attempted, retried by hand, ended) or deleted: nothing to do.
    Stale,
}

/// A delivery whose attempt is starting: the record as stored and the webhook as current at
/// that moment — a URL change or secret rotation made before it applies, none made after.
pub struct InFlight {
    pub record: DeliveryRecord,
    pub hook: Arc<HookEntry>,
    /// The schedule entry's token (`None` for a test send, which has no entry).
    token: Option<u64>,
}

impl InFlight {
    /// The attempt a test send makes: it has no schedule entry.
    pub fn test(record: DeliveryRecord, hook: Arc<HookEntry>) -> InFlight {
        InFlight {
            record,
            hook,
            token: None,
        }
    }

    /// The number of the attempt being made.
    pub fn number(&self) -> u32 {
        self.record.attempt_count + 1
    }
}

/// A due delivery whose webhook is no longer active.
pub struct Stopped {
    id: DeliveryId,
    token: u64,
    status: WebhookStatus,
}

/// What an attempt's outcome made of the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Delivered,
    /// Another attempt is scheduled at this unix ms.
    Retrying {
        next_ms: u64,
    },
    /// No further attempt (schedule exhausted, or a test send).
    Failed,
    /// A manual retry was asked for while the attempt ran: it runs next, at this token.
    RetryQueued {
        next_ms: u64,
    },
    /// The delivery or its webhook was deleted while the attempt ran: nothing was written.
    Gone,
}

/// Checks a due entry against the stored record and the registry. Called when the attempt is
/// about to start (not when the entry was queued), so that a pause, delete, URL change or
/// rotation made while it waited applies to it.
pub fn admit(
    store: &Store,
    registry: &Registry,
    id: DeliveryId,
    token: u64,
) -> Result<Admission, StoreError> {
    let Some(record) = store.get_delivery(id)? else {
        return Ok(Admission::Stale);
    };
    if record.next_attempt_ms != Some(token) || !record.status.is_open() {
        return Ok(Admission::Stale);
    }
    let Some(hook) = registry.hook(id.webhook) else {
        return Ok(Admission::Stale);
    };
    if hook.hook.status != WebhookStatus::Active {
        return Ok(Admission::Stopped(Stopped {
            id,
            token,
            status: hook.hook.status,
        }));
    }
    Ok(Admission::Start(InFlight {
        record,
        hook,
        token: Some(token),
    }))
}

/// A manual retry's token: due now, and later than any token the delivery had, so that no
/// earlier entry can pass for it.
pub fn retry_token(now: u64, old: Option<u64>) -> u64 {
    now.max(old.map_or(0, |d| d + 1))
}

/// Applies an attempt's outcome to `record` (as currently stored) and decides the next step:
/// this is where the time of the next attempt is decided.
///
/// `token` is what the record carried when the attempt started; if it changed meanwhile, a
/// manual retry came in, and it stands: the retry's attempt runs next whatever this one did.
pub fn settle(
    record: &mut DeliveryRecord,
    token: Option<u64>,
    attempt: &AttemptRecord,
    success: bool,
    config: &Config,
    now: u64,
) -> Settled {
    record.attempt_count = record.attempt_count.max(attempt.number);
    record.response_code = attempt.response_code;
    record.response_time_ms = Some(attempt.response_time_ms);
    record.updated_ms = now;
    if record.next_attempt_ms != token {
        if let (true, Some(next_ms)) = (record.status.is_open(), record.next_attempt_ms) {
            return Settled::RetryQueued { next_ms };
        }
    }
    record.note = None;
    if success {
        record.status = DeliveryStatus::Delivered;
        record.next_attempt_ms = None;
        return Settled::Delivered;
    }
    if endpoint_gone(attempt, record.is_test) {
        record.status = DeliveryStatus::Failed;
        record.next_attempt_ms = None;
        record.note = Some(GONE_NOTE.to_string());
        return Settled::Failed;
    }
    match (!record.is_test)
        .then(|| config.retry_delay(attempt.number))
        .flatten()
    {
        Some(delay) => {
            let scheduled = delay.as_millis() as u64;
            let mut wait = scheduled;
            if let Some(asked) = retry_after_ms(attempt, now) {
                // Never earlier than the schedule (a receiver cannot make us hammer it), never
                // later than a day (a typo cannot park a delivery past retention).
                wait = scheduled.max(asked.min(MAX_RETRY_AFTER_MS));
                if wait > scheduled {
                    record.note = Some(format!(
                        "the endpoint answered {} with Retry-After: next attempt in {} s instead of {} s",
                        attempt.response_code.unwrap_or_default(),
                        wait.div_ceil(1000),
                        scheduled.div_ceil(1000),
                    ));
                }
            }
            let next_ms = now + wait;
            record.status = DeliveryStatus::Retrying;
            record.next_attempt_ms = Some(next_ms);
            Settled::Retrying { next_ms }
        }
        None => {
            record.status = DeliveryStatus::Failed;
            record.next_attempt_ms = None;
            Settled::Failed
        }
    }
}

/// The longest wait a `Retry-After` can ask for.
pub const MAX_RETRY_AFTER_MS: u64 = 24 * 3600 * 1000;

/// The note on a delivery that a `410 Gone` ended.
const GONE_NOTE: &str = "the endpoint answered 410 Gone: the webhook was disabled";

/// The note on the open deliveries a `410 Gone` to another delivery ended.
const GONE_OPEN_NOTE: &str =
    "not attempted: the endpoint answered 410 Gone to another delivery and the webhook was disabled; retry it by hand once the webhook is enabled again";

/// Whether an attempt's answer says the endpoint is gone for good (`410 Gone`). A test send's
/// 410 is shown to whoever ran it and changes nothing.
fn endpoint_gone(attempt: &AttemptRecord, is_test: bool) -> bool {
    !is_test && attempt.response_code == Some(410)
}

/// How long a `429` or `503` answer asks us to wait (RFC 9110 `Retry-After`: delay-seconds or
/// an HTTP date, relative to `now`). `None` for other answers or an unreadable value.
pub fn retry_after_ms(attempt: &AttemptRecord, now: u64) -> Option<u64> {
    if !matches!(attempt.response_code, Some(429 | 503)) {
        return None;
    }
    let value = attempt
        .response_headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        .map(|(_, v)| v.trim())?;
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Absurdly long digit strings saturate (and are clamped to a day by the caller).
        return Some(
            value
                .parse::<u64>()
                .unwrap_or(u64::MAX)
                .saturating_mul(1000),
        );
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at_ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64;
    Some(at_ms.saturating_sub(now))
}

// ---- the writer ----

/// A function that takes a command's answer.
pub type Callback<T> = Box<dyn FnOnce(Result<T, DeliveryError>) + Send>;

/// Where a command's answer goes: an async caller's oneshot, a plain thread's channel, or a
/// function called on the writer thread (which must not block).
enum Reply<T> {
    Async(oneshot::Sender<Result<T, DeliveryError>>),
    Blocking(Sender<Result<T, DeliveryError>>),
    Callback(Callback<T>),
}

impl<T> Reply<T> {
    fn send(self, value: Result<T, DeliveryError>) {
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(value);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(value);
            }
            Reply::Callback(f) => f(value),
        }
    }
}

/// Deleting a webhook's or an account's deliveries (with the rest of their records).
enum Forget {
    Webhook(Webhook),
    Account(Account),
}

/// One transition for the writer to apply.
enum Command {
    /// New deliveries (fan-out, test sends). With `recovery`, deliveries that exist already
    /// are kept and their index and schedule entries written again.
    Create {
        records: Vec<DeliveryRecord>,
        recovery: bool,
        reply: Reply<usize>,
    },
    /// New deliveries from fan-out, held unwritten for [`HELD_WINDOW`]. `scheduled` is
    /// answered once their first attempts are scheduled, `written` once all of them are
    /// written.
    CreateHeld {
        records: Vec<DeliveryRecord>,
        scheduled: Reply<()>,
        written: Reply<usize>,
    },
    /// Writes every held delivery now (fan-out's last act before shutdown).
    WriteHeld {
        reply: Reply<()>,
    },
    Outcome {
        id: DeliveryId,
        token: Option<u64>,
        is_test: bool,
        attempt: AttemptRecord,
        success: bool,
        reply: Reply<Settled>,
    },
    Retry {
        id: DeliveryId,
        account: AccountId,
        reply: Reply<Option<DeliveryRecord>>,
    },
    Stop {
        stopped: Stopped,
        reply: Reply<()>,
    },
    /// Re-sends a webhook's deliveries that ended `failed` in a window (`recover`).
    Recover {
        webhook: WebhookId,
        since_ms: u64,
        until_ms: u64,
        reply: Reply<usize>,
    },
    Forget {
        what: Forget,
        reply: Reply<()>,
    },
    /// Deletes the finished deliveries a retention batch planned, each only if it is still
    /// stored as planned (a retry may have reopened it meanwhile): `Store::apply_purge`.
    Purge {
        plan: PurgePlan,
        reply: Reply<PurgedBatch>,
    },
}

/// The handle every stage uses to change deliveries. Cheap to clone.
#[derive(Clone)]
pub struct Deliveries {
    tx: Sender<Command>,
}

/// A retention batch handed to the writer: [`PurgeSent::wait`] for what it deleted.
pub struct PurgeSent(Receiver<Result<PurgedBatch, DeliveryError>>);

impl PurgeSent {
    /// Blocks until the writer has applied the batch.
    pub fn wait(self) -> Result<PurgedBatch, DeliveryError> {
        self.0.recv().map_err(|_| DeliveryError::Closed)?
    }
}

/// The writer thread; ends once every [`Deliveries`] handle is gone.
pub struct Writer {
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Waits until the writer has applied everything sent before the last handle was dropped.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Deliveries {
    /// Starts the writer thread.
    pub fn start(
        store: Arc<Store>,
        registry: Arc<Registry>,
        config: Arc<Config>,
        scheduler: SchedulerHandle,
    ) -> (Deliveries, Writer) {
        let (tx, rx) = channel::bounded(QUEUE);
        let ctx = WriterContext {
            store,
            registry,
            config,
            scheduler,
        };
        let thread = std::thread::Builder::new()
            .name("kyberhook-delivery-writer".into())
            .spawn(move || ctx.run(rx))
            .expect("spawning the delivery writer thread");
        (
            Deliveries { tx },
            Writer {
                thread: Some(thread),
            },
        )
    }

    /// Creates deliveries from a plain thread (fan-out) and waits until they are written and
    /// their first attempts scheduled. Returns how many are owed an attempt.
    pub fn create_blocking(
        &self,
        records: Vec<DeliveryRecord>,
        recovery: bool,
    ) -> Result<usize, DeliveryError> {
        let (tx, rx) = channel::bounded(1);
        self.tx
            .send(Command::Create {
                records,
                recovery,
                reply: Reply::Blocking(tx),
            })
            .map_err(|_| DeliveryError::Closed)?;
        rx.recv().map_err(|_| DeliveryError::Closed)?
    }

    /// Creates fan-out's deliveries from a plain thread and waits until their first attempts
    /// are scheduled (which paces fan-out to the writer, as a write would), not until they
    /// are written: the records are held unwritten for up to [`HELD_WINDOW`], and `written`
    /// is called on the writer thread once every one of them is (or the write failed).
    pub fn create_held(
        &self,
        records: Vec<DeliveryRecord>,
        written: Callback<usize>,
    ) -> Result<(), DeliveryError> {
        let (tx, rx) = channel::bounded(1);
        self.tx
            .send(Command::CreateHeld {
                records,
                scheduled: Reply::Blocking(tx),
                written: Reply::Callback(written),
            })
            .map_err(|_| DeliveryError::Closed)?;
        rx.recv().map_err(|_| DeliveryError::Closed)?
    }

    /// Writes every held delivery now, from a plain thread, and waits until they are written
    /// and their `create_held` callbacks called.
    pub fn write_held_blocking(&self) -> Result<(), DeliveryError> {
        let (tx, rx) = channel::bounded(1);
        self.tx
            .send(Command::WriteHeld {
                reply: Reply::Blocking(tx),
            })
            .map_err(|_| DeliveryError::Closed)?;
        rx.recv().map_err(|_| DeliveryError::Closed)?
    }

    /// Creates deliveries (a test send's) and waits until they are written.
    pub async fn create(&self, records: Vec<DeliveryRecord>) -> Result<usize, DeliveryError> {
        self.call(|reply| Command::Create {
            records,
            recovery: false,
            reply,
        })
        .await
    }

    /// Records an attempt and applies its outcome; answers what became of the delivery.
    pub async fn outcome(
        &self,
        flight: &InFlight,
        attempt: AttemptRecord,
        success: bool,
    ) -> Result<Settled, DeliveryError> {
        let (id, token, is_test) = (flight.record.id, flight.token, flight.record.is_test);
        self.call(|reply| Command::Outcome {
            id,
            token,
            is_test,
            attempt,
            success,
            reply,
        })
        .await
    }

    /// Schedules a manual retry of one of `account`'s deliveries, due now. `None`: no such
    /// delivery (any more).
    pub async fn retry(
        &self,
        id: DeliveryId,
        account: AccountId,
    ) -> Result<Option<DeliveryRecord>, DeliveryError> {
        self.call(|reply| Command::Retry { id, account, reply })
            .await
    }

    /// Re-sends every delivery of `webhook` that ended `failed` (its last change) in
    /// `[since_ms, until_ms)`: same ids, a new attempt each, all due now — the dispatcher's
    /// plan rate paces them. Answers how many.
    pub async fn recover(
        &self,
        webhook: WebhookId,
        since_ms: u64,
        until_ms: u64,
    ) -> Result<usize, DeliveryError> {
        self.call(|reply| Command::Recover {
            webhook,
            since_ms,
            until_ms,
            reply,
        })
        .await
    }

    /// Ends a delivery whose webhook stopped taking deliveries before its attempt started.
    pub async fn stop(&self, stopped: Stopped) -> Result<(), DeliveryError> {
        self.call(|reply| Command::Stop { stopped, reply }).await
    }

    /// Deletes a webhook with its deliveries. Remove it from the registry first: the writer
    /// then writes nothing more for it (an outcome arriving later finds it gone).
    pub async fn forget_webhook(&self, hook: Webhook) -> Result<(), DeliveryError> {
        self.call(|reply| Command::Forget {
            what: Forget::Webhook(hook),
            reply,
        })
        .await
    }

    /// Deletes an account with its webhooks, deliveries and events (registry first, as above).
    pub async fn forget_account(&self, account: Account) -> Result<(), DeliveryError> {
        self.call(|reply| Command::Forget {
            what: Forget::Account(account),
            reply,
        })
        .await
    }

    /// Has the writer delete one retention batch (see [`Command::Purge`]), from a plain
    /// thread (the retention thread); [`PurgeSent::wait`] blocks for the outcome.
    pub fn send_purge(&self, plan: PurgePlan) -> Result<PurgeSent, DeliveryError> {
        let (tx, rx) = channel::bounded(1);
        self.tx
            .send(Command::Purge {
                plan,
                reply: Reply::Blocking(tx),
            })
            .map_err(|_| DeliveryError::Closed)?;
        Ok(PurgeSent(rx))
    }

    async fn call<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, DeliveryError> {
        let (tx, rx) = oneshot::channel();
        match self.tx.try_send(make(Reply::Async(tx))) {
            Ok(()) => {}
            Err(TrySendError::Disconnected(_)) => return Err(DeliveryError::Closed),
            // A full queue must not block an async worker: wait for room on a blocking thread.
            Err(TrySendError::Full(cmd)) => {
                let send = self.tx.clone();
                tokio::task::spawn_blocking(move || send.send(cmd).is_ok())
                    .await
                    .map_err(|_| DeliveryError::Closed)?
                    .then_some(())
                    .ok_or(DeliveryError::Closed)?;
            }
        }
        rx.await.map_err(|_| DeliveryError::Closed)?
    }
}

struct WriterContext {
    store: Arc<Store>,
    registry: Arc<Registry>,
    config: Arc<Config>,
    scheduler: SchedulerHandle,
}

/// An answer to send once the drain's writes are on the store (or failed).
type Answer = Box<dyn FnOnce(Option<&DeliveryError>) + Send>;

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
    /// Webhooks whose endpoint answered `410 Gone`, with the delivery that got it.
    gone: Vec<(WebhookId, DeliveryId)>,
    /// Changes of whether a delivery waits for an attempt, for the account's backlog count:
    /// (account, old due, new due).
    backlog: Vec<(AccountId, Option<u64>, Option<u64>)>,
    answers: Vec<Answer>,
    /// Batches of deliveries this drain began to hold, with the answer each waits for.
    held: Vec<(Vec<DeliveryId>, Answer)>,
}

/// A batch of held deliveries (one `create_held`), answered once every one of them is
/// written: as its attempts settle, or when its window ends.
struct HeldBatch {
    /// When the batch's window ends: whatever of it is still held is written then.
    until: Instant,
    ids: Vec<DeliveryId>,
    /// How many of `ids` are still held.
    unwritten: usize,
    /// Taken when the batch is answered.
    answer: Option<Answer>,
}

/// The writer's held batches, oldest first (windows end in that order), and which batch each
/// held delivery belongs to.
#[derive(Default)]
struct Held {
    batches: VecDeque<HeldBatch>,
    /// The number of `batches[0]`; batches are numbered in creation order.
    first: u64,
    /// Held delivery → its batch's number.
    of: HashMap<DeliveryId, u64>,
}

impl Held {
    fn add(&mut self, until: Instant, ids: Vec<DeliveryId>, answer: Answer) {
        let no = self.first + self.batches.len() as u64;
        for id in &ids {
            self.of.insert(*id, no);
        }
        self.batches.push_back(HeldBatch {
            until,
            unwritten: ids.len(),
            ids,
            answer: Some(answer),
        });
    }

    /// `id` was written: returns its batch's answer if that was the batch's last one held.
    fn written(&mut self, id: DeliveryId) -> Option<Answer> {
        let no = self.of.remove(&id)?;
        let batch = self.batches.get_mut((no - self.first) as usize)?;
        batch.unwritten -= 1;
        if batch.unwritten == 0 {
            batch.answer.take()
        } else {
            None
        }
    }

    /// When the next held batch's window ends (now, if more are held than [`HELD_MAX`]).
    fn next_due(&self) -> Option<Instant> {
        let oldest = self.batches.front()?;
        Some(if self.of.len() > HELD_MAX {
            Instant::now()
        } else {
            oldest.until
        })
    }

    /// Drops answered batches from the front.
    fn trim(&mut self) {
        while self.batches.front().is_some_and(|b| b.answer.is_none()) {
            self.batches.pop_front();
            self.first += 1;
        }
    }
}

impl Drain {
    fn is_empty(&self) -> bool {
        self.answers.is_empty() && self.records.is_empty() && self.held.is_empty()
    }

    fn get(&self, store: &Store, id: DeliveryId) -> Result<Option<DeliveryRecord>, StoreError> {
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
}

impl WriterContext {
    fn run(self, rx: Receiver<Command>) {
        let mut held = Held::default();
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
                    other => self.apply(&mut drain, other),
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
    /// oldest beyond [`HELD_MAX`] too), at most about [`MAX_DRAIN`] of them, so that outcomes
    /// waiting behind are not held up by a burst; the run loop comes back for the rest. With
    /// `None`, writes everything held. Deliveries written meanwhile (their attempt settled)
    /// are not written again; a batch is answered once its last held delivery is written.
    fn write_held(&self, held: &mut Held, now: Option<Instant>) {
        held.trim();
        let mut due_ids = Vec::new();
        let mut due_batches = 0;
        for batch in &held.batches {
            let due = match now {
                None => true,
                Some(now) => {
                    due_ids.len() < MAX_DRAIN
                        && (batch.until <= now || held.of.len() - due_ids.len() > HELD_MAX)
                }
            };
            if !due {
                break;
            }
            due_batches += 1;
            due_ids.extend(batch.ids.iter().filter(|id| held.of.contains_key(id)));
        }
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
        // Batches are numbered: `commit` may drop answered ones from the front.
        let due_end = held.first + due_batches as u64;
        if let Some(err) = self.commit(d, held) {
            // The store refuses writes: stop holding them rather than retry in a loop. Their
            // attempts find nothing to send, and their events' fan-out (still owed, the
            // batches answer the error) re-runs at the next start.
            let still_due = due_end.saturating_sub(held.first) as usize;
            for batch in held.batches.iter_mut().take(still_due) {
                for id in &batch.ids {
                    if held.of.remove(id).is_some() {
                        self.store.release_unwritten(*id);
                    }
                }
                if let Some(answer) = batch.answer.take() {
                    answer(Some(&err));
                }
            }
            held.trim();
        }
    }

    fn apply(&self, d: &mut Drain, cmd: Command) {
        let now = clock::now_ms();
        match cmd {
            Command::Create {
                records,
                recovery,
                reply,
            } => match self.create(d, records, recovery) {
                Ok(n) => d.answers.push(answer(reply, n)),
                Err(e) => reply.send(Err(e.into())),
            },
            Command::CreateHeld {
                records,
                scheduled,
                written,
            } => {
                d.answers.push(answer(scheduled, ()));
                self.create_held(d, records, written);
            }
            Command::Outcome {
                id,
                token,
                is_test,
                attempt,
                success,
                reply,
            } => {
                let record = match d.get(&self.store, id) {
                    Ok(r) => r,
                    Err(e) => return reply.send(Err(e.into())),
                };
                // A deleted webhook's deliveries are deleted (or about to be, by a Forget
                // queued behind this): write nothing for them.
                let Some(mut record) = record.filter(|_| self.registry.hook(id.webhook).is_some())
                else {
                    return d.answers.push(answer(reply, Settled::Gone));
                };
                let old_due = record.next_attempt_ms;
                if endpoint_gone(&attempt, is_test) && !d.gone.iter().any(|(h, _)| *h == id.webhook)
                {
                    d.gone.push((id.webhook, id));
                }
                let settled = settle(&mut record, token, &attempt, success, &self.config, now);
                if let Settled::Retrying { next_ms } = settled {
                    d.wheel.push((id, next_ms, next_ms));
                }
                d.attempts.push((id, attempt));
                d.put(record, old_due);
                if !is_test {
                    d.outcomes.push((id.webhook, success));
                }
                d.answers.push(answer(reply, settled));
            }
            Command::Retry { id, account, reply } => {
                let record = match d.get(&self.store, id) {
                    Ok(r) => r,
                    Err(e) => return reply.send(Err(e.into())),
                };
                let Some(mut record) = record.filter(|r| {
                    r.account_id == account && self.registry.hook(id.webhook).is_some()
                }) else {
                    return d.answers.push(answer(reply, None));
                };
                let old_due = record.next_attempt_ms;
                let token = retry_token(now, old_due);
                record.next_attempt_ms = Some(token);
                if record.status != DeliveryStatus::Pending {
                    record.status = DeliveryStatus::Retrying;
                }
                record.note = None;
                record.updated_ms = now;
                d.wheel.push((id, token, now));
                d.put(record.clone(), old_due);
                d.answers.push(answer(reply, Some(record)));
            }
            Command::Stop { stopped, reply } => {
                let record = match d.get(&self.store, stopped.id) {
                    Ok(r) => r,
                    Err(e) => return reply.send(Err(e.into())),
                };
                if let Some(mut record) = record
                    .filter(|r| r.next_attempt_ms == Some(stopped.token) && r.status.is_open())
                {
                    let old_due = record.next_attempt_ms;
                    record.status = DeliveryStatus::Failed;
                    record.next_attempt_ms = None;
                    record.updated_ms = now;
                    record.note = Some(format!(
                        "not attempted: the webhook was {} when the attempt came due; retry it by hand once the webhook is active",
                        stopped.status.as_str()
                    ));
                    d.put(record, old_due);
                }
                d.answers.push(answer(reply, ()));
            }
            Command::Recover {
                webhook,
                since_ms,
                until_ms,
                reply,
            } => {
                if self.registry.hook(webhook).is_none() {
                    return d.answers.push(answer(reply, 0));
                }
                let ended = |r: &DeliveryRecord| {
                    r.status == DeliveryStatus::Failed
                        && !r.is_test
                        && (since_ms..until_ms).contains(&r.updated_ms)
                };
                let found = match self.store.webhook_deliveries(webhook, ended) {
                    Ok(found) => found,
                    Err(e) => return reply.send(Err(e.into())),
                };
                let mut n = 0;
                for stored in found {
                    // This drain may have changed it already.
                    let Ok(Some(mut record)) = d.get(&self.store, stored.id) else {
                        continue;
                    };
                    if !ended(&record) {
                        continue;
                    }
                    let old_due = record.next_attempt_ms;
                    let token = retry_token(now, old_due);
                    record.next_attempt_ms = Some(token);
                    record.status = DeliveryStatus::Retrying;
                    record.note = Some("re-sent by a recover".into());
                    record.updated_ms = now;
                    d.wheel.push((record.id, token, now));
                    d.put(record, old_due);
                    n += 1;
                }
                d.answers.push(answer(reply, n));
            }
            Command::Forget { reply, .. } => {
                // Handled in `run`; never reaches here.
                reply.send(Err(DeliveryError::Closed));
            }
            Command::Purge { reply, .. } => {
                // Handled in `run`; never reaches here.
                reply.send(Err(DeliveryError::Closed));
            }
            Command::WriteHeld { reply } => {
                // Handled in `run`; never reaches here.
                reply.send(Err(DeliveryError::Closed));
            }
        }
    }

    /// Holds fan-out's new deliveries unwritten (see [`HELD_WINDOW`]) and schedules their
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
            self.store.hold_unwritten(r);
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
                d.get(&self.store, r.id)?
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
    fn commit(&self, mut d: Drain, held: &mut Held) -> Option<DeliveryError> {
        if d.is_empty() {
            return None;
        }
        let first_written: HashSet<DeliveryId> = d
            .records
            .keys()
            .copied()
            .filter(|id| self.store.is_unwritten(*id))
            .collect();
        let mut still_pending = 0u64;
        for id in &first_written {
            let record = &d.records[id];
            if record.status == DeliveryStatus::Pending {
                still_pending += 1;
            }
            d.indexed.push((record.account_id.clone(), *id));
            // Readers see the new state from here on, never the one it replaces.
            self.store.hold_unwritten(record.clone());
        }
        let mut writes = DeliveryWrites {
            attempts: d.attempts,
            deliveries: d.records.into_values().collect(),
            indexed: d.indexed,
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
                self.store.release_unwritten(*id);
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
                    self.store.release_unwritten(*id);
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
        held: &mut Held,
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
        for mut record in self.store.webhook_deliveries(id, |r| r.status.is_open())? {
            let old_due = record.next_attempt_ms;
            record.status = DeliveryStatus::Failed;
            record.next_attempt_ms = None;
            record.updated_ms = now;
            record.note = Some(GONE_OPEN_NOTE.to_string());
            drain.put(record, old_due);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{EventId, WebhookId};

    fn config() -> Config {
        Config::from_toml(
            "[delivery]\nretry_schedule = [\"1s\", \"2s\"]\n[auth]\nadmin_token = \"unit-test-token-0123456789abcdefghij\"\n",
            "t",
        )
        .unwrap()
    }

    fn record(next: Option<u64>, status: DeliveryStatus) -> DeliveryRecord {
        DeliveryRecord {
            id: DeliveryId {
                seq: 1,
                webhook: WebhookId(1),
            },
            account_id: AccountId::parse("acc_1").unwrap(),
            event_id: EventId::from_seq(1),
            event: "user.login".into(),
            status,
            attempt_count: 0,
            response_code: None,
            response_time_ms: None,
            updated_ms: 0,
            next_attempt_ms: next,
            note: None,
            is_test: false,
        }
    }

    fn attempt(number: u32) -> AttemptRecord {
        AttemptRecord {
            number,
            at_ms: 0,
            response_code: Some(500),
            response_time_ms: 3,
            response_headers: vec![],
            response_body: String::new(),
            error: None,
            timestamp: 0,
            signature: String::new(),
        }
    }

    #[test]
    fn a_failure_follows_the_schedule_then_fails() {
        let c = config();
        let mut r = record(Some(10), DeliveryStatus::Pending);
        assert_eq!(
            settle(&mut r, Some(10), &attempt(1), false, &c, 100),
            Settled::Retrying { next_ms: 1_100 }
        );
        assert_eq!(r.next_attempt_ms, Some(1_100));
        assert_eq!(r.status, DeliveryStatus::Retrying);
        settle(&mut r, Some(1_100), &attempt(2), false, &c, 2_000);
        assert_eq!(r.next_attempt_ms, Some(4_000));
        assert_eq!(
            settle(&mut r, Some(4_000), &attempt(3), false, &c, 5_000),
            Settled::Failed
        );
        assert_eq!(
            (r.status, r.next_attempt_ms),
            (DeliveryStatus::Failed, None)
        );
        assert_eq!(r.attempt_count, 3);
    }

    #[test]
    fn a_manual_retry_during_the_attempt_stands_whatever_the_outcome() {
        let c = config();
        for success in [false, true] {
            let mut r = record(Some(10), DeliveryStatus::Pending);
            // The retry came in while attempt 1 (token 10) was in flight.
            let token = retry_token(50, r.next_attempt_ms);
            r.next_attempt_ms = Some(token);
            assert_eq!(
                settle(&mut r, Some(10), &attempt(1), success, &c, 100),
                Settled::RetryQueued { next_ms: 50 }
            );
            assert_eq!(r.next_attempt_ms, Some(50));
            assert!(r.status.is_open());
            assert_eq!(r.attempt_count, 1);
        }
    }

    #[test]
    fn retry_tokens_are_never_earlier_than_an_old_one() {
        assert_eq!(retry_token(100, None), 100);
        assert_eq!(retry_token(100, Some(40)), 100);
        assert_eq!(retry_token(100, Some(100)), 101);
        assert_eq!(retry_token(100, Some(5_000)), 5_001);
    }

    fn answered(code: u16, retry_after: &str) -> AttemptRecord {
        let mut a = attempt(1);
        a.response_code = Some(code);
        a.response_headers = vec![("Retry-After".into(), retry_after.into())];
        a
    }

    #[test]
    fn retry_after_is_clamped_between_the_schedule_and_a_day() {
        let c = config();
        let next = |a: &AttemptRecord| {
            let mut r = record(Some(10), DeliveryStatus::Pending);
            match settle(&mut r, Some(10), a, false, &c, 1_000_000) {
                Settled::Retrying { next_ms } => next_ms - 1_000_000,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(next(&answered(503, "120")), 120_000);
        assert_eq!(
            next(&answered(429, "0")),
            1_000,
            "the schedule is the floor"
        );
        assert_eq!(
            next(&answered(429, "9999999999999999999999")),
            MAX_RETRY_AFTER_MS
        );
        assert_eq!(next(&answered(500, "120")), 1_000, "only 429 and 503 ask");
        assert_eq!(next(&answered(503, "soon")), 1_000, "unreadable: ignored");
        // An HTTP date, relative to the engine's now.
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + 90);
        assert_eq!(next(&answered(503, &httpdate::fmt_http_date(at))), 90_000);
        // A date in the past asks for nothing.
        let past = std::time::UNIX_EPOCH + std::time::Duration::from_secs(10);
        assert_eq!(next(&answered(503, &httpdate::fmt_http_date(past))), 1_000);
    }

    #[test]
    fn a_410_ends_the_delivery_at_once_and_a_test_send_s_410_changes_nothing() {
        let c = config();
        let mut r = record(Some(10), DeliveryStatus::Pending);
        assert_eq!(
            settle(&mut r, Some(10), &answered(410, ""), false, &c, 100),
            Settled::Failed
        );
        assert!(r.note.as_deref().unwrap().contains("410 Gone"));
        assert!(endpoint_gone(&answered(410, ""), false));
        assert!(!endpoint_gone(&answered(410, ""), true));
        assert!(!endpoint_gone(&answered(404, ""), false));
    }

    #[test]
    fn a_test_send_is_never_retried() {
        let c = config();
        let mut r = record(None, DeliveryStatus::Pending);
        r.is_test = true;
        assert_eq!(
            settle(&mut r, None, &attempt(1), false, &c, 100),
            Settled::Failed
        );
    }
}
