//! Ingest: turns an accepted request into a durable event and fans it out.
//!
//! Requests (from `api`) are validated and built into [`EventRecord`]s on the async workers —
//! the compact JSON body every attempt will send is made here, once. They are then handed over
//! a bounded crossbeam channel to the **group committer**, a dedicated thread that owns the
//! write-ahead log: it blocks for one request, drains whatever else is queued (up to
//! `MAX_BATCH`), checks idempotency, appends the whole batch to the store, makes it
//! power-safe with one flush + fdatasync, and only then answers every waiting request (202).
//! After the acknowledgement it hands the batch to the **fan-out thread** (a bounded queue),
//! which finds the matching webhooks in the registry's subscription index, writes the delivery
//! records and hands each to the scheduler as due now — so fan-out work never delays the next
//! group commit.
//!
//! An event that some webhook subscribes to is written with an `inbox` entry, cleared only by
//! the flush *after* the one that made its deliveries durable, so a crash at any point leaves
//! either the deliveries or the inbox entry, and start-up fan-out ([`Ingest::start`])
//! re-creates whatever is missing.

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
    New(EventId),
    /// The account used this id before: nothing new was created.
    Duplicate(EventId),
}

impl Accepted {
    pub fn id(&self) -> &EventId {
        match self {
            Accepted::New(id) | Accepted::Duplicate(id) => id,
        }
    }
}

enum Commit {
    Events {
        events: Vec<EventRecord>,
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
    seq: Arc<Sequencer>,
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
                commit_loop(
                    rx,
                    store.clone(),
                    &committer_registry,
                    fan_tx,
                    fanned.clone(),
                );
                // The fan-out thread ends once the committer's sender is gone; then whatever
                // it fanned out last is flushed and its inbox entries cleared.
                let _ = fanout_thread.join();
                let last = std::mem::take(&mut *fanned.lock().unwrap_or_else(|p| p.into_inner()));
                if store.make_durable().is_ok() {
                    let _ = store.clear_inbox(&last);
                }
                if let Err(err) = store.make_durable() {
                    tracing::error!(error = %err, "final flush failed");
                }
            })
            .expect("spawning the committer thread");
        Ok((
            Ingest { tx, seq, registry },
            Committer {
                thread: Some(thread),
            },
        ))
    }

    /// Validates one event and builds its record (body included). Does not store it.
    pub fn prepare(&self, input: &EventInput<'_>) -> Result<EventRecord, Rejection> {
        let account = AccountId::parse(&input.account_id)
            .filter(|a| self.registry.account_exists(a))
            .ok_or_else(|| Rejection::UnknownAccount(input.account_id.clone()))?;
        if !self.registry.is_cataloged(&input.event) {
            return Err(Rejection::UnknownEventType(input.event.clone()));
        }
        let now = clock::now_ms();
        let seq = self.seq.next(now);
        let id = match &input.id {
            Some(text) => EventId::parse(text).ok_or_else(|| {
                Rejection::Invalid(format!(
                    "id must be 1 to {} characters of [A-Za-z0-9_.-]",
                    EventId::MAX_LEN
                ))
            })?,
            None => EventId::from_seq(seq),
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
        let body = build_body(
            id.as_str(),
            &input.event,
            &timestamp,
            data,
            account.as_str(),
        )?;
        Ok(EventRecord {
            seq,
            id,
            account_id: account,
            event: input.event.clone(),
            body,
        })
    }

    /// Queues events for the next group commit and waits until they are durable.
    pub async fn submit(&self, events: Vec<EventRecord>) -> Result<Vec<Accepted>, IngestError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Commit::Events { events, reply })
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

    /// A fresh sequence number (test sends use it for their event and delivery).
    pub fn next_seq(&self) -> u64 {
        self.seq.next(clock::now_ms())
    }

    /// How many commits are waiting.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }
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

fn commit_loop(
    rx: Receiver<Commit>,
    store: Arc<Store>,
    registry: &Registry,
    fanout: Sender<Vec<EventRecord>>,
    fanned: Arc<Mutex<Vec<u64>>>,
) {
    // Inbox entries whose deliveries were made durable by the last flush: cleared in the next
    // commit, so clearing one never depends on the order sled persists writes in.
    let mut owed_clear: Vec<u64> = Vec::new();
    loop {
        let first = match rx.recv_timeout(IDLE_FLUSH) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => {
                let ready = take_fanned(&fanned);
                if (ready.is_empty() && owed_clear.is_empty()) || store.make_durable().is_err() {
                    owed_clear.extend(ready);
                    continue;
                }
                owed_clear.extend(ready);
                let _ = store.clear_inbox(&owed_clear);
                owed_clear.clear();
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
        let started = std::time::Instant::now();
        let mut fresh: Vec<EventRecord> = Vec::new();
        let mut seen: HashMap<(AccountId, EventId), EventId> = HashMap::new();
        let mut outcomes: Vec<Result<Vec<Accepted>, String>> = Vec::with_capacity(batch.len());
        for c in &mut batch {
            let Commit::Events { events, .. } = c else {
                outcomes.push(Ok(Vec::new()));
                continue;
            };
            let mut accepted = Vec::with_capacity(events.len());
            let mut result = Ok(());
            for e in events.drain(..) {
                // An id minted from the event's own fresh sequence number cannot be a repeat;
                // only ids the producer chose need the idempotency lookups.
                if e.id.is_minted_for(e.seq) {
                    accepted.push(Accepted::New(e.id.clone()));
                    fresh.push(e);
                    continue;
                }
                let key = (e.account_id.clone(), e.id.clone());
                if let Some(id) = seen.get(&key) {
                    accepted.push(Accepted::Duplicate(id.clone()));
                    continue;
                }
                match store.event_seq(&e.account_id, e.id.as_str()) {
                    Ok(Some(_)) => accepted.push(Accepted::Duplicate(e.id.clone())),
                    Ok(None) => {
                        seen.insert(key, e.id.clone());
                        accepted.push(Accepted::New(e.id.clone()));
                        fresh.push(e);
                    }
                    Err(err) => result = Err(err.to_string()),
                }
            }
            outcomes.push(result.map(|()| accepted));
        }
        // Taken before the flush, so the flush covers their deliveries.
        let ready = take_fanned(&fanned);
        // Only events some webhook subscribes to owe a fan-out (and an inbox mark): the rest
        // are durable and done once committed.
        let owed: Vec<bool> = fresh
            .iter()
            .map(|e| registry.has_subscriber(&e.account_id, &e.event))
            .collect();
        let written = store
            .append_events_owing(&fresh, &owed)
            .and_then(|()| store.clear_inbox(&owed_clear))
            .and_then(|()| store.make_durable());
        metrics::histogram!("kyberhook_wal_flush_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("kyberhook_wal_batch_events").record(fresh.len() as f64);
        if written.is_ok() {
            owed_clear = ready;
        } else {
            // Nothing of this commit is known to be on disk: keep everything owed.
            owed_clear.extend(ready);
        }
        let failed = written.as_ref().err().map(|e| e.to_string());
        if let Some(err) = &failed {
            tracing::error!(error = %err, "group commit failed; the batch is not acknowledged");
        }
        for (c, outcome) in batch.into_iter().zip(outcomes) {
            match c {
                Commit::Events { reply, .. } => {
                    let _ = reply.send(match &failed {
                        Some(err) => Err(err.clone()),
                        None => outcome,
                    });
                }
                Commit::Sync { reply } => {
                    let _ = reply.send(match &failed {
                        Some(err) => Err(err.clone()),
                        None => Ok(()),
                    });
                }
            }
        }
        if failed.is_some() {
            continue;
        }
        metrics::counter!("kyberhook_events_ingested_total").increment(fresh.len() as u64);
        // A full fan-out queue holds the committer here, which fills the ingest queue, which
        // answers 503: backpressure instead of unbounded memory.
        let to_fan_out: Vec<EventRecord> = fresh
            .into_iter()
            .zip(owed)
            .filter_map(|(e, owed)| owed.then_some(e))
            .collect();
        if !to_fan_out.is_empty() && fanout.send(to_fan_out).is_err() {
            tracing::error!("the fan-out thread is gone; fan-out will be re-run at start-up");
        }
    }
    // Cleared after the final flush, in the committer thread's epilogue.
    fanned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(owed_clear);
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
