//! Delivery: every state transition of a delivery, and the one thread that writes them.
//!
//! A delivery moves through typed stages. It is created (fan-out, a test send) with a schedule
//! entry whose *token* is its `next_attempt_ms`; when the entry comes due, [`admit`] checks it
//! against the stored record and the webhook's current state *at the moment the attempt would
//! start* and answers [`Admission::Start`] with an [`InFlight`], [`Admission::Stopped`] (the
//! webhook was paused or disabled) or [`Admission::Stale`] (superseded, deleted). The outcome of
//! the attempt is settled into a [`Settled`] stage — delivered, retrying at a time, failed,
//! or waiting for a manual retry that came in meanwhile.
//!
//! The folder has one file per concern:
//! - `state.rs`, the state machine: every transition (create, admit, settle, stop, manual
//!   retry, recover, the 410 fan-in) as a pure function over the record, unit-tested one by
//!   one, and the one place a delivery's status and next-attempt time are set. The token rules
//!   — which time an entry carries, when an entry is superseded — are all there.
//! - `writer.rs`, the delivery writer: **writes happen on one thread**. Every change — create,
//!   outcome, manual retry, recover, stop, forgetting a webhook's or account's deliveries,
//!   purging those past retention — is a [`Command`] sent over a bounded crossbeam channel by
//!   the [`Deliveries`] handle (this file). The writer applies each against an in-memory
//!   overlay by calling the transition and applying what it returns, writes the whole drain
//!   tree by tree in crash-safe order ([`crate::store::Storage::apply_delivery_writes`]), and only then
//!   answers each caller and hands new schedule entries to the scheduler. Because one thread
//!   applies every read-modify-write of a delivery record, a manual retry and an attempt's
//!   outcome never overwrite each other, and nothing on the async runtime waits for a
//!   delivery write. Webhook failure counts (auto-disable) are updated there too, after the
//!   drain's write.
//! - `held.rs`, the held windows: deliveries that fan-out creates are **held** rather than
//!   written ([`HELD_WINDOW`]; their records wait in the store's overlay,
//!   `store/embedded/held.rs`): their first attempts are scheduled at once, and a delivery
//!   whose first attempt settles within the window is written once, settled, with no schedule
//!   entry written and removed for it. What is still held when the window ends is written as
//!   created. Fan-out hears that a batch is written only then, so the events' inbox marks
//!   (which re-run fan-out after a crash) stand until every delivery of theirs is on the store.
//!
//! Reads (admission's record, the event body, the delivery log) happen anywhere, on the async
//! workers too: they go to the store directly (through the held overlay), are served from
//! sled's page cache and never wait for a flush. Durability needs no step of its own: the
//! writer's writes ride sled's periodic flush (200 ms) and the group committer's next
//! `make_durable`, and the API answers a manual retry or a delete only after `Ingest::sync`.
//!
//! **Who writes what, and who waits for what** (issue 12: nothing on the runtime waits for
//! the disk):
//!
//! - the **group committer** writes `events`, `event_ids` and `inbox`, with one flush +
//!   `fdatasync` per commit; it waits for its bounded queue and for the disk;
//! - **fan-out** writes nothing itself: it hands creates to the delivery writer and waits for
//!   the writer's "scheduled" answer (`create_held`), not for the write;
//! - the **delivery writer** writes `deliveries`, `attempts`, `by_webhook`, `by_account`,
//!   `schedule` and `stats`, and webhook failure counts; it waits for its bounded queue or for
//!   the next held window's end;
//! - **retention** deletes events and `stats` hours past retention itself (events under the
//!   store's chunk lock) and plans the purge of finished deliveries, which the writer applies
//!   (`Command::Purge`); it waits for the writer's answer;
//! - the **tokio workers** write nothing on the hot path: handlers await the committer or the
//!   writer over oneshots (a full queue is waited on through `spawn_blocking`); they write
//!   `accounts` and `webhooks` (rare, under the registry's write lock).

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use tokio::sync::oneshot;

use crate::config::Config;
use crate::ids::{AccountId, DeliveryId, WebhookId};
use crate::model::{Account, AttemptRecord, DeliveryRecord, Webhook};
use crate::registry::Registry;
use crate::scheduler::SchedulerHandle;
use crate::store::{PurgePlan, PurgedBatch, Storage, StoreError};

mod held;
mod state;
mod writer;

pub use held::HELD_WINDOW;
pub use state::{
    admit, created, retry_after_ms, retry_token, Admission, FirstAttempt, InFlight, Settled,
    Stopped, MAX_RETRY_AFTER_MS,
};

/// Commands waiting for the writer; a full queue makes async callers wait off the runtime.
const QUEUE: usize = 8192;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the delivery writer has stopped")]
    Closed,
}

// ---- the handle ----

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

/// What the writer is asked to do.
enum Command {
    /// A change applied, in order, into the writer's current drain.
    Apply(Change),
    /// A barrier: what came before is written, then the webhook's or account's deliveries
    /// are deleted (with the rest of their records).
    Forget { what: Forget, reply: Reply<()> },
    /// A barrier: what came before is written, then every held delivery (fan-out's last act
    /// before shutdown).
    WriteHeld { reply: Reply<()> },
    /// Deletes the finished deliveries a retention batch planned, each only if it is still
    /// stored as planned (a retry may have reopened it meanwhile): `Storage::apply_purge`, after
    /// the drain it arrived in is written, so that its re-check sees every change the drain
    /// made.
    Purge {
        plan: PurgePlan,
        reply: Reply<PurgedBatch>,
    },
}

/// A change to deliveries, made by a transition of the state machine.
enum Change {
    /// New deliveries (fan-out, test sends). With `recovery`, deliveries that exist already
    /// are kept and their index and schedule entries written again.
    Create {
        records: Vec<DeliveryRecord>,
        recovery: bool,
        reply: Reply<usize>,
    },
    /// New deliveries from fan-out, held for [`HELD_WINDOW`]. `scheduled` is answered once
    /// their first attempts are scheduled, `written` once all of them are written.
    CreateHeld {
        records: Vec<DeliveryRecord>,
        scheduled: Reply<()>,
        written: Reply<usize>,
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
        store: Arc<dyn Storage>,
        registry: Arc<Registry>,
        config: Arc<Config>,
        scheduler: SchedulerHandle,
    ) -> (Deliveries, Writer) {
        let (tx, rx) = channel::bounded(QUEUE);
        let thread = writer::spawn(store, registry, config, scheduler, rx);
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
            .send(Command::Apply(Change::Create {
                records,
                recovery,
                reply: Reply::Blocking(tx),
            }))
            .map_err(|_| DeliveryError::Closed)?;
        rx.recv().map_err(|_| DeliveryError::Closed)?
    }

    /// Creates fan-out's deliveries from a plain thread and waits until their first attempts
    /// are scheduled (which paces fan-out to the writer, as a write would), not until they
    /// are written: the records are held for up to [`HELD_WINDOW`], and `written`
    /// is called on the writer thread once every one of them is (or the write failed).
    pub fn create_held(
        &self,
        records: Vec<DeliveryRecord>,
        written: Callback<usize>,
    ) -> Result<(), DeliveryError> {
        let (tx, rx) = channel::bounded(1);
        self.tx
            .send(Command::Apply(Change::CreateHeld {
                records,
                scheduled: Reply::Blocking(tx),
                written: Reply::Callback(written),
            }))
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
        self.call(|reply| {
            Command::Apply(Change::Create {
                records,
                recovery: false,
                reply,
            })
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
        self.call(|reply| {
            Command::Apply(Change::Outcome {
                id,
                token,
                is_test,
                attempt,
                success,
                reply,
            })
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
        self.call(|reply| Command::Apply(Change::Retry { id, account, reply }))
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
        self.call(|reply| {
            Command::Apply(Change::Recover {
                webhook,
                since_ms,
                until_ms,
                reply,
            })
        })
        .await
    }

    /// Ends a delivery whose webhook stopped taking deliveries before its attempt started.
    pub async fn stop(&self, stopped: Stopped) -> Result<(), DeliveryError> {
        self.call(|reply| Command::Apply(Change::Stop { stopped, reply }))
            .await
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
