//! Ingest: turns an accepted request into a durable event and fans it out.
//!
//! Requests (from `api`) are validated and built into [`PendingEvent`]s on the async workers —
//! the compact JSON body every attempt will send is made here, once ([`body`]). They are then
//! handed over a bounded crossbeam channel to the **group committer** ([`commit`]), a dedicated
//! thread that owns the write-ahead log: it blocks for one request, drains whatever else is
//! queued (up to `MAX_BATCH`), gives each event its sequence number in commit order (and writes
//! a minted id into the body), checks idempotency of producer-chosen ids, appends the whole
//! batch to the store's chunked event log, makes it power-safe with one flush + fdatasync, and
//! only then answers every waiting request (202). After the acknowledgement it hands the batch
//! to the **fan-out thread** ([`fanout`], a bounded queue), which finds the matching webhooks in
//! the registry's subscription index, writes the delivery records and hands each to the
//! scheduler as due now — so fan-out work never delays the next group commit.
//!
//! An event that some webhook subscribes to is written with an `inbox` entry, cleared only
//! after the flush that made its deliveries durable, so a crash at any point leaves either the
//! deliveries or the inbox entry, and start-up fan-out ([`Ingest::start`]) re-creates whatever
//! is missing.
//!
//! Account and webhook changes ride the same group commit: the API writes them, then waits
//! for [`Ingest::sync`] before it answers. Fan-out writes deliveries in chunks of 4 096, so
//! one event to 100 000 webhooks never builds one huge list; a chunk written before an error
//! is harmless, since delivery ids are derived from (event, webhook) and the re-run at
//! start-up adds only what is missing. The registry's subscription index makes each event's
//! lookup three hash probes (exact name, family, `*`).
//!
//! This file holds the API's handle ([`Ingest`]: validate, submit, sync), the request and
//! error types, and start-up; the threads live in [`commit`] and [`fanout`].

mod body;
mod commit;
mod fanout;

pub use body::build_body;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam::channel::{self, Sender, TrySendError};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::delivery::{Deliveries, DeliveryError};
use crate::ids::{AccountId, EventId, Sequencer};
use crate::model::{rfc3339, EventRecord};
use crate::partition::Partition;
use crate::registry::Registry;
use crate::store::{Storage, StoreError, StoreErrorKind};

use body::BODY_ID_AT;
use commit::{commit_loop, take_fanned};
use fanout::{fanout_loop, Fanout, Recovery};

/// How deeply an event's `data` may nest; deeper payloads are refused with a 400 so that no
/// receiver's parser is made to recurse without bound.
pub const MAX_DATA_DEPTH: usize = 64;
/// Most events one commit takes (a batch request counts each of its events); bounds the
/// latency and the memory one commit adds.
const MAX_BATCH: usize = 4096;
/// Committed batches waiting for the fan-out thread.
const FANOUT_QUEUE: usize = 64;
/// Idle time after which owed inbox clean-up is flushed without waiting for new work.
const IDLE_FLUSH: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the ingest queue is full")]
    Busy,
    #[error("the engine is shutting down")]
    Closed,
    #[error("the write-ahead log could not be written: {0}")]
    Commit(#[from] StoreError),
}

/// Why one event of a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{0}")]
    Invalid(String),
    #[error("account {0:?} does not exist")]
    UnknownAccount(String),
    #[error("event type {0:?} is not in the catalog (GET /v1/event-types)")]
    UnknownEventType(String),
}

/// The JSON a producer posts for one event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventInput<'a> {
    pub account_id: String,
    pub event: String,
    #[serde(borrow)]
    pub data: &'a RawValue,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub timestamp: Option<String>,
}

/// What the committer did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Stored under this sequence number.
    New(EventId, u64),
    /// The account used this id before: nothing new was created.
    Duplicate(EventId),
}

impl Accepted {
    pub fn id(&self) -> &EventId {
        match self {
            Accepted::New(id, _) | Accepted::Duplicate(id) => id,
        }
    }
}

/// An event validated and built on an async worker, waiting for the committer to give it its
/// sequence number (and, unless the producer chose one, its id).
#[derive(Debug, Clone)]
pub struct PendingEvent {
    /// `seq` is 0 until committed; a minted id is a placeholder of the final length.
    record: EventRecord,
    /// The prefix of the id the committer mints (`evt_`, or `evt_test_` for test sends),
    /// which is followed by the sequence number in 16 hex digits.
    mint: Option<&'static str>,
}

impl PendingEvent {
    /// The account the event belongs to.
    pub fn account_id(&self) -> &AccountId {
        &self.record.account_id
    }

    /// The event's type (`visitor.checked_in`).
    pub fn event_type(&self) -> &str {
        &self.record.event
    }

    /// Gives the event its sequence number and, when minted, writes its id into the record
    /// and, in place, into the body (the placeholder has the same length).
    fn commit_as(mut self, seq: u64) -> EventRecord {
        self.record.seq = seq;
        if let Some(prefix) = self.mint {
            let id = EventId::minted(prefix, seq);
            let end = BODY_ID_AT + id.as_str().len();
            if let Some(slot) = self.record.body.get_mut(BODY_ID_AT..end) {
                slot.copy_from_slice(id.as_str().as_bytes());
            }
            self.record.id = id;
        }
        self.record
    }
}

enum Commit {
    Events {
        events: Vec<PendingEvent>,
        /// Test sends: stored, never fanned out.
        quiet: bool,
        reply: oneshot::Sender<Result<Vec<Accepted>, StoreError>>,
    },
    Sync {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl Commit {
    fn len(&self) -> usize {
        match self {
            Commit::Events { events, .. } => events.len(),
            Commit::Sync { .. } => 1,
        }
    }
}

/// The API's side of ingest: validation, record building, and the committer's queue.
#[derive(Clone)]
pub struct Ingest {
    tx: Sender<Commit>,
    registry: Arc<Registry>,
    /// Fan-out for owed events (recovery: each chunk written before the next).
    owed: Arc<Fanout>,
}

/// Re-runs the fan-out owed for the inbox entries `owed`, makes it durable and clears them;
/// returns how many events it fanned out. Blocking; on a thread inside the runtime.
fn run_owed(store: &dyn Storage, fanout: &Fanout, owed: Vec<u64>) -> Result<usize, DeliveryError> {
    if owed.is_empty() {
        return Ok(0);
    }
    let events: Vec<EventRecord> = owed
        .iter()
        .filter_map(|s| store.get_event(*s).transpose())
        .collect::<Result<_, _>>()?;
    fanout.run(&events, Recovery::Yes)?;
    store.make_durable()?;
    store.clear_inbox(&owed)?;
    Ok(events.len())
}

pub struct Committer {
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    /// Waits until the committer has written and flushed everything queued before the last
    /// [`Ingest`] handle was dropped.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Ingest {
    /// Re-runs fan-out owed from before a stop (`owed_now`; a node sharing the store instead
    /// runs it per partition as it takes them: [`Ingest::recover_owed`]), then starts the
    /// committer thread.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        store: Arc<dyn Storage>,
        registry: Arc<Registry>,
        deliveries: Deliveries,
        seq: Arc<Sequencer>,
        queue: usize,
        runtime: tokio::runtime::Handle,
        lag: Arc<crate::pushback::Lag>,
        owed_now: bool,
    ) -> Result<(Ingest, Committer), DeliveryError> {
        let fanned: Arc<Mutex<Vec<u64>>> = Arc::default();
        let fanout = Fanout {
            registry: registry.clone(),
            deliveries,
            lag,
            fanned: fanned.clone(),
        };
        let owed = Arc::new(Fanout {
            registry: registry.clone(),
            deliveries: fanout.deliveries.clone(),
            lag: fanout.lag.clone(),
            fanned: Arc::default(),
        });
        {
            let _guard = runtime.enter();
            let inbox = if owed_now { store.inbox()? } else { Vec::new() };
            let n = run_owed(&*store, &owed, inbox)?;
            if n > 0 {
                tracing::info!(events = n, "re-ran fan-out owed from before the last stop");
            }
        }
        let (tx, rx) = channel::bounded(queue);
        let (fan_tx, fan_rx) = channel::bounded::<Vec<EventRecord>>(FANOUT_QUEUE);
        let lag = fanout.lag.clone();
        let fanout_thread = {
            let runtime = runtime.clone();
            std::thread::Builder::new()
                .name("kyberhook-fanout".into())
                .spawn(move || {
                    let _guard = runtime.enter();
                    fanout_loop(fan_rx, fanout)
                })
                .expect("spawning the fan-out thread")
        };
        let committer_registry = registry.clone();
        let thread = std::thread::Builder::new()
            .name("kyberhook-committer".into())
            .spawn(move || {
                let _guard = runtime.enter();
                commit_loop(
                    rx,
                    &*store,
                    &committer_registry,
                    &seq,
                    fan_tx,
                    &fanned,
                    &lag,
                );
                // The fan-out thread ends once the committer's sender is gone; then whatever
                // it fanned out last is flushed and its inbox entries cleared.
                let _ = fanout_thread.join();
                let last = take_fanned(&fanned);
                if store.make_durable().is_ok() {
                    let _ = store.clear_inbox(&last);
                }
                if let Err(err) = store.make_durable() {
                    tracing::error!(error = %err, "final flush failed");
                }
            })
            .expect("spawning the committer thread");
        Ok((
            Ingest { tx, registry, owed },
            Committer {
                thread: Some(thread),
            },
        ))
    }

    /// Re-runs the fan-out owed for events of accounts in `partitions` (a node that just took
    /// them over: their previous owner acknowledged them and may have stopped before fanning
    /// them out). Blocking; on a thread inside the runtime.
    pub fn recover_owed(
        &self,
        store: &dyn Storage,
        partitions: &[Partition],
    ) -> Result<usize, DeliveryError> {
        run_owed(store, &self.owed, store.inbox_in(partitions)?)
    }

    /// Validates one event and builds its record (body included). Does not store it.
    pub fn prepare(&self, input: &EventInput<'_>) -> Result<PendingEvent, Rejection> {
        let account = AccountId::parse(&input.account_id)
            .filter(|a| self.registry.account_exists(a))
            .ok_or_else(|| Rejection::UnknownAccount(input.account_id.clone()))?;
        if !self.registry.is_cataloged(&input.event) {
            return Err(Rejection::UnknownEventType(input.event.clone()));
        }
        let id = match &input.id {
            Some(text) => Some(EventId::parse(text).ok_or_else(|| {
                Rejection::Invalid(format!(
                    "id must be 1 to {} characters of [A-Za-z0-9_.-]",
                    EventId::MAX_LEN
                ))
            })?),
            None => None,
        };
        let timestamp = match &input.timestamp {
            Some(text) => crate::model::parse_rfc3339(text)
                .map(rfc3339)
                .ok_or_else(|| {
                    Rejection::Invalid(format!(
                        "timestamp {text:?} is not an RFC 3339 time like 2025-01-15T09:30:00Z"
                    ))
                })?,
            None => rfc3339(crate::model::now_ms()),
        };
        let data = input.data.get();
        if !data.trim_start().starts_with('{') {
            return Err(Rejection::Invalid("data must be a JSON object".into()));
        }
        pending_event(account, &input.event, &timestamp, data, id.ok_or(MINTED))
    }

    /// Queues events for the next group commit and waits until they are durable.
    pub async fn submit(&self, events: Vec<PendingEvent>) -> Result<Vec<Accepted>, IngestError> {
        self.enqueue(events, false).await
    }

    /// Stores a test send's event (never fanned out) and returns it as stored.
    pub async fn submit_test(
        &self,
        account: AccountId,
        event: &str,
        timestamp: &str,
        data: &str,
    ) -> Result<Result<EventRecord, Rejection>, IngestError> {
        let pending = match pending_event(account, event, timestamp, data, Err(TEST)) {
            Ok(p) => p,
            Err(r) => return Ok(Err(r)),
        };
        let template = pending.clone();
        let accepted = self.enqueue(vec![pending], true).await?;
        match accepted.first() {
            Some(Accepted::New(_, seq)) => Ok(Ok(template.commit_as(*seq))),
            _ => Err(IngestError::Commit(StoreError::new(
                StoreErrorKind::Internal,
                "the test event was not stored",
            ))),
        }
    }

    async fn enqueue(
        &self,
        events: Vec<PendingEvent>,
        quiet: bool,
    ) -> Result<Vec<Accepted>, IngestError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Commit::Events {
                events,
                quiet,
                reply,
            })
            .map_err(|e| match e {
                TrySendError::Full(_) => IngestError::Busy,
                TrySendError::Disconnected(_) => IngestError::Closed,
            })?;
        rx.await
            .map_err(|_| IngestError::Closed)?
            .map_err(IngestError::Commit)
    }

    /// Waits until every write made so far (by anyone) is durable: the API's acknowledgement
    /// of account and webhook changes rides on the same group commit as events.
    pub async fn sync(&self) -> Result<(), IngestError> {
        let (reply, rx) = oneshot::channel();
        let send = self.tx.clone();
        // A full queue must not fail an API write: wait for room off the async workers.
        tokio::task::spawn_blocking(move || send.send(Commit::Sync { reply }))
            .await
            .map_err(|_| IngestError::Closed)?
            .map_err(|_| IngestError::Closed)?;
        rx.await
            .map_err(|_| IngestError::Closed)?
            .map_err(IngestError::Commit)
    }
}

/// The prefixes of ids the committer mints: for produced events, and for test sends.
const MINTED: &str = "evt_";
const TEST: &str = "evt_test_";

/// Builds a pending event whose id is the producer's (`Ok`) or minted at commit with the given
/// prefix (`Err`).
fn pending_event(
    account: AccountId,
    event: &str,
    timestamp: &str,
    data: &str,
    id: Result<EventId, &'static str>,
) -> Result<PendingEvent, Rejection> {
    let (id, mint) = match id {
        Ok(id) => (id, None),
        Err(prefix) => (EventId::minted(prefix, 0), Some(prefix)),
    };
    let body = build_body(id.as_str(), event, timestamp, data, account.as_str())?;
    Ok(PendingEvent {
        record: EventRecord {
            seq: 0,
            id,
            account_id: account,
            event: event.to_string(),
            body,
        },
        mint,
    })
}
