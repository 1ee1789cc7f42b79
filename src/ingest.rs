//! Ingest: turns an accepted request into a durable event and fans it out.
//!
//! Requests (from `api`) are validated and built into [`PendingEvent`]s on the async workers —
//! the compact JSON body every attempt will send is made here, once. They are then handed over
//! a bounded crossbeam channel to the **group committer**, a dedicated thread that owns the
//! write-ahead log: it blocks for one request, drains whatever else is queued (up to
//! `MAX_BATCH`), gives each event its sequence number in commit order (and writes a minted id
//! into the body), checks idempotency of producer-chosen ids, appends the whole batch to the
//! store's chunked event log, makes it power-safe with one flush + fdatasync, and only then
//! answers every waiting request (202). After the acknowledgement it hands the batch to the
//! **fan-out thread** (a bounded queue), which finds the matching webhooks in the registry's
//! subscription index, writes the delivery records and hands each to the scheduler as due now
//! — so fan-out work never delays the next group commit.
//!
//! An event that some webhook subscribes to is written with an `inbox` entry, cleared only
//! after the flush that made its deliveries durable, so a crash at any point leaves either the
//! deliveries or the inbox entry, and start-up fan-out ([`Ingest::start`]) re-creates whatever
//! is missing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TrySendError};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::clock;
use crate::ids::{AccountId, DeliveryId, EventId, Sequencer};
use crate::model::{rfc3339, DeliveryRecord, EventRecord};
use crate::registry::Registry;
use crate::scheduler::SchedulerHandle;
use crate::store::{Store, StoreError};

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
    Commit(String),
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

/// Where a minted id starts in a body: `{"id":"` comes first (see [`build_body`]).
const BODY_ID_AT: usize = 7;

impl PendingEvent {
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
        reply: oneshot::Sender<Result<Vec<Accepted>, String>>,
    },
    Sync {
        reply: oneshot::Sender<Result<(), String>>,
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
    /// Re-runs fan-out owed from before a stop, then starts the committer thread.
    pub fn start(
        store: Arc<Store>,
        registry: Arc<Registry>,
        scheduler: SchedulerHandle,
        seq: Arc<Sequencer>,
        queue: usize,
        runtime: tokio::runtime::Handle,
    ) -> Result<(Ingest, Committer), StoreError> {
        let fanout = Fanout {
            store: store.clone(),
            registry: registry.clone(),
            scheduler,
        };
        let owed = store.inbox()?;
        if !owed.is_empty() {
            let events: Vec<EventRecord> = owed
                .iter()
                .filter_map(|s| store.get_event(*s).transpose())
                .collect::<Result<_, _>>()?;
            tracing::info!(
                events = events.len(),
                "re-running fan-out owed from before the last stop"
            );
            let _guard = runtime.enter();
            fanout.run(&events, Recovery::Yes)?;
            store.make_durable()?;
            store.clear_inbox(&owed)?;
        }
        let (tx, rx) = channel::bounded(queue);
        let (fan_tx, fan_rx) = channel::bounded::<Vec<EventRecord>>(FANOUT_QUEUE);
        let fanned: Arc<Mutex<Vec<u64>>> = Arc::default();
        let fanout_thread = {
            let fanned = fanned.clone();
            let runtime = runtime.clone();
            std::thread::Builder::new()
                .name("kyberhook-fanout".into())
                .spawn(move || {
                    let _guard = runtime.enter();
                    fanout_loop(fan_rx, fanout, fanned)
                })
                .expect("spawning the fan-out thread")
        };
        let committer_registry = registry.clone();
        let thread = std::thread::Builder::new()
            .name("kyberhook-committer".into())
            .spawn(move || {
                let _guard = runtime.enter();
                commit_loop(rx, &store, &committer_registry, &seq, fan_tx, &fanned);
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
            Ingest { tx, registry },
            Committer {
                thread: Some(thread),
            },
        ))
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
            _ => Err(IngestError::Commit("the test event was not stored".into())),
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

    /// How many commits are waiting.
    pub fn queued(&self) -> usize {
        self.tx.len()
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

/// `{"id":…,"event":…,"timestamp":…,"data":…,"account_id":…}` with no insignificant
/// whitespace: the bytes every attempt sends and every signature covers.
///
/// Fails when `data` nests deeper than [`MAX_DATA_DEPTH`].
pub fn build_body(
    id: &str,
    event: &str,
    timestamp: &str,
    data: &str,
    account: &str,
) -> Result<Vec<u8>, Rejection> {
    let mut out = Vec::with_capacity(data.len() + 128);
    out.extend_from_slice(b"{\"id\":");
    push_json_string(&mut out, id);
    out.extend_from_slice(b",\"event\":");
    push_json_string(&mut out, event);
    out.extend_from_slice(b",\"timestamp\":");
    push_json_string(&mut out, timestamp);
    out.extend_from_slice(b",\"data\":");
    if minify_into(&mut out, data) > MAX_DATA_DEPTH {
        return Err(Rejection::Invalid(format!(
            "data nests objects and arrays deeper than {MAX_DATA_DEPTH} levels"
        )));
    }
    out.extend_from_slice(b",\"account_id\":");
    push_json_string(&mut out, account);
    out.push(b'}');
    Ok(out)
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing a string into a Vec cannot fail");
}

/// Copies already-validated JSON, dropping whitespace outside strings. Everything else —
/// key order, number spelling, escapes — stays byte for byte as the producer sent it.
/// Returns the deepest nesting of objects and arrays it saw.
pub fn minify_into(out: &mut Vec<u8>, json: &str) -> usize {
    let mut in_string = false;
    let mut escaped = false;
    let mut depth = 0usize;
    let mut deepest = 0usize;
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b' ' | b'\n' | b'\r' | b'\t' => {}
                b'"' => {
                    in_string = true;
                    out.push(b);
                }
                b'{' | b'[' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                    out.push(b);
                }
                b'}' | b']' => {
                    depth = depth.saturating_sub(1);
                    out.push(b);
                }
                _ => out.push(b),
            }
        }
    }
    deepest
}

/// Takes the sequence numbers the fan-out thread has finished (their deliveries are written).
fn take_fanned(fanned: &Mutex<Vec<u64>>) -> Vec<u64> {
    std::mem::take(&mut *fanned.lock().unwrap_or_else(|p| p.into_inner()))
}

/// A batch the committer appended, waiting for the flush that makes it durable.
struct Appended {
    /// Each request's reply and what to answer once the batch is durable.
    replies: Vec<(Reply, Result<Vec<Accepted>, String>)>,
    /// Committed events that owe a fan-out.
    fan_out: Vec<EventRecord>,
    events: usize,
    /// The append itself failed: nothing of the batch is acknowledged.
    failed: Option<String>,
}

enum Reply {
    Events(oneshot::Sender<Result<Vec<Accepted>, String>>),
    Sync(oneshot::Sender<Result<(), String>>),
}

/// The committer: takes whatever requests are queued (up to [`MAX_BATCH`] events), gives
/// their events sequence numbers, checks idempotency, appends them to the store, makes them
/// durable with one flush, answers every request, and passes the events to the fan-out
/// thread. (Overlapping the append of one batch with the flush of the previous one was tried:
/// sled's flush then also waits for the concurrent appends, and batch ingest fell by half.)
fn commit_loop(
    rx: Receiver<Commit>,
    store: &Store,
    registry: &Registry,
    seq: &Sequencer,
    fanout: Sender<Vec<EventRecord>>,
    fanned: &Mutex<Vec<u64>>,
) {
    loop {
        let first = match rx.recv_timeout(IDLE_FLUSH) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => {
                // Inbox marks owed a clear-up are not left waiting for the next request.
                let ready = take_fanned(fanned);
                if !ready.is_empty() {
                    if let Err(err) = flush_and_clear(store, fanned, ready) {
                        tracing::warn!(error = %err, "idle flush failed; retried with the next");
                    }
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut events_in_batch = first.len();
        let mut batch = vec![first];
        while events_in_batch < MAX_BATCH {
            match rx.try_recv() {
                Ok(c) => {
                    events_in_batch += c.len();
                    batch.push(c);
                }
                Err(_) => break,
            }
        }
        let mut fresh: Vec<EventRecord> = Vec::new();
        // Per fresh event: whether a webhook subscribes to it, so it owes a fan-out.
        let mut owed: Vec<bool> = Vec::new();
        let mut seen: HashMap<(AccountId, EventId), EventId> = HashMap::new();
        let mut replies = Vec::with_capacity(batch.len());
        // Sequence numbers are given here, in commit order, so the log's chunks never overlap.
        let now = clock::now_ms();
        for c in batch {
            let (events, quiet, reply) = match c {
                Commit::Events {
                    events,
                    quiet,
                    reply,
                } => (events, quiet, reply),
                Commit::Sync { reply } => {
                    replies.push((Reply::Sync(reply), Ok(Vec::new())));
                    continue;
                }
            };
            let mut accepted = Vec::with_capacity(events.len());
            let mut result = Ok(());
            for p in events {
                // A minted id cannot be a repeat; only ids the producer chose need the
                // idempotency lookups.
                if p.mint.is_none() {
                    let key = (p.record.account_id.clone(), p.record.id.clone());
                    if let Some(id) = seen.get(&key) {
                        accepted.push(Accepted::Duplicate(id.clone()));
                        continue;
                    }
                    match store.event_seq(&p.record.account_id, p.record.id.as_str()) {
                        Ok(Some(_)) => {
                            accepted.push(Accepted::Duplicate(p.record.id.clone()));
                            continue;
                        }
                        Ok(None) => {
                            seen.insert(key, p.record.id.clone());
                        }
                        Err(err) => {
                            result = Err(err.to_string());
                            continue;
                        }
                    }
                }
                let e = p.commit_as(seq.next(now));
                accepted.push(Accepted::New(e.id.clone(), e.seq));
                // Only events some webhook subscribes to owe a fan-out (and an inbox mark):
                // the rest are durable and done once committed.
                owed.push(!quiet && registry.has_subscriber(&e.account_id, &e.event));
                fresh.push(e);
            }
            replies.push((Reply::Events(reply), result.map(|()| accepted)));
        }
        let failed = store
            .append_events_owing(&fresh, &owed)
            .err()
            .map(|e| e.to_string());
        let appended = Appended {
            replies,
            events: fresh.len(),
            fan_out: fresh
                .into_iter()
                .zip(owed)
                .filter_map(|(e, owed)| owed.then_some(e))
                .collect(),
            failed,
        };
        finish(appended, store, &fanout, fanned);
    }
}

/// Makes an appended batch durable with one flush, answers its requests, and passes its
/// events to the fan-out thread. Inbox marks of events whose deliveries the fan-out thread had
/// written before the flush started are cleared after it: a crash at any point leaves either
/// the deliveries or the mark.
fn finish(a: Appended, store: &Store, fanout: &Sender<Vec<EventRecord>>, fanned: &Mutex<Vec<u64>>) {
    let started = std::time::Instant::now();
    // Taken before the flush, so the flush covers their deliveries.
    let ready = take_fanned(fanned);
    let flushed = flush_and_clear(store, fanned, ready);
    metrics::histogram!("kyberhook_wal_flush_seconds").record(started.elapsed().as_secs_f64());
    metrics::histogram!("kyberhook_wal_batch_events").record(a.events as f64);
    let failed = a.failed.or_else(|| flushed.err());
    if let Some(err) = &failed {
        tracing::error!(error = %err, "group commit failed; the batch is not acknowledged");
    }
    for (reply, outcome) in a.replies {
        match reply {
            Reply::Events(tx) => {
                let _ = tx.send(match &failed {
                    Some(err) => Err(err.clone()),
                    None => outcome,
                });
            }
            Reply::Sync(tx) => {
                let _ = tx.send(match &failed {
                    Some(err) => Err(err.clone()),
                    None => Ok(()),
                });
            }
        }
    }
    if failed.is_some() {
        return;
    }
    metrics::counter!("kyberhook_events_ingested_total").increment(a.events as u64);
    // A full fan-out queue holds the committer here, which fills the ingest queue, which
    // answers 503: backpressure instead of unbounded memory.
    if !a.fan_out.is_empty() && fanout.send(a.fan_out).is_err() {
        tracing::error!("the fan-out thread is gone; fan-out will be re-run at start-up");
    }
}

/// One durable flush; then the inbox marks of `ready` (events whose deliveries were written
/// before it) are cleared. On failure they stay owed.
fn flush_and_clear(store: &Store, fanned: &Mutex<Vec<u64>>, ready: Vec<u64>) -> Result<(), String> {
    match store.make_durable() {
        Ok(()) => {
            if let Err(err) = store.clear_inbox(&ready) {
                tracing::warn!(error = %err, "clearing inbox marks failed; fan-out re-runs at start-up");
            }
            Ok(())
        }
        Err(err) => {
            fanned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(ready);
            Err(err.to_string())
        }
    }
}

/// The fan-out thread: creates the deliveries of committed events, off the committer's path,
/// and reports which events are done.
fn fanout_loop(rx: Receiver<Vec<EventRecord>>, fanout: Fanout, fanned: Arc<Mutex<Vec<u64>>>) {
    while let Ok(mut events) = rx.recv() {
        while events.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => events.extend(more),
                Err(_) => break,
            }
        }
        match fanout.run(&events, Recovery::No) {
            Ok(()) => fanned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(events.iter().map(|e| e.seq)),
            // The inbox entries stay: fan-out is re-run at the next start.
            Err(err) => {
                tracing::error!(error = %err, "fan-out failed; it will be retried at start-up")
            }
        }
    }
}

/// Whether fan-out re-runs for events whose deliveries may partly exist already.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recovery {
    Yes,
    No,
}

/// Creates the deliveries of acknowledged events and schedules their first attempts.
struct Fanout {
    store: Arc<Store>,
    registry: Arc<Registry>,
    scheduler: SchedulerHandle,
}

impl Fanout {
    fn run(&self, events: &[EventRecord], recovery: Recovery) -> Result<(), StoreError> {
        let now = clock::now_ms();
        let mut records = Vec::new();
        for e in events {
            for hook in self.registry.matching(&e.account_id, &e.event) {
                let id = DeliveryId {
                    seq: e.seq,
                    webhook: hook.hook.id,
                };
                records.push(DeliveryRecord::new(id, e, now, false));
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        let owed = match recovery {
            Recovery::Yes => self.store.create_deliveries(records)?,
            Recovery::No => self.store.create_fresh_deliveries(records)?,
        };
        for r in owed {
            if let Some(due) = r.next_attempt_ms {
                self.scheduler.schedule_blocking(r.id, due, due);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minify_keeps_strings_and_drops_whitespace() {
        let mut out = Vec::new();
        let depth = minify_into(
            &mut out,
            "{ \"a b\" : [1, 2,\n\t3], \"s\": \"x \\\" y\\\\\", \"u\": \"\\u00e9 é\", \"d\": \"[{\" }",
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a b":[1,2,3],"s":"x \" y\\","u":"\u00e9 é","d":"[{"}"#
        );
        assert_eq!(depth, 2, "brackets inside strings do not count");
    }

    #[test]
    fn body_has_the_contract_shape() {
        let body = build_body(
            "evt_1",
            "visitor.checked_in",
            "2025-01-15T09:30:00Z",
            "{ \"k\": 1 }",
            "acc_1",
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(body.clone()).unwrap(),
            r#"{"id":"evt_1","event":"visitor.checked_in","timestamp":"2025-01-15T09:30:00Z","data":{"k":1},"account_id":"acc_1"}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"]["k"], 1);
    }
}
