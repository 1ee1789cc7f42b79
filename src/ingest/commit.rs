//! The group committer thread: the one writer of the write-ahead log.
//!
//! Requests enter from [`super::Ingest`] over a bounded crossbeam channel; each drained batch
//! gets its sequence numbers, is appended to the store's event log and made durable with one
//! flush, and then every request is answered over its oneshot channel. Events that owe a
//! fan-out leave over a bounded channel to the fan-out thread ([`super::fanout`]), which reports
//! back (through `fanned`) the events whose deliveries are written, so that their inbox marks
//! are cleared after the next flush.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

use super::{Accepted, Commit, IDLE_FLUSH, MAX_BATCH};
use crate::clock;
use crate::ids::{AccountId, EventId, Sequencer};
use crate::model::EventRecord;
use crate::pushback::Lag;
use crate::registry::Registry;
use crate::store::{Storage, StoreError};

/// Takes the sequence numbers the fan-out thread has finished (their deliveries are written).
pub(super) fn take_fanned(fanned: &Mutex<Vec<u64>>) -> Vec<u64> {
    std::mem::take(&mut *fanned.lock().unwrap_or_else(|p| p.into_inner()))
}

/// A batch the committer appended, waiting for the flush that makes it durable.
struct Appended {
    /// Each request's reply and what to answer once the batch is durable.
    replies: Vec<(Reply, Result<Vec<Accepted>, StoreError>)>,
    /// Committed events that owe a fan-out.
    fan_out: Vec<EventRecord>,
    events: usize,
    /// The append itself failed: nothing of the batch is acknowledged.
    failed: Option<StoreError>,
}

enum Reply {
    Events(oneshot::Sender<Result<Vec<Accepted>, StoreError>>),
    Sync(oneshot::Sender<Result<(), StoreError>>),
}

/// The committer: takes whatever requests are queued (up to [`MAX_BATCH`] events), gives
/// their events sequence numbers, checks idempotency (one store question per batch), appends them to the store, makes them
/// durable with one flush, answers every request, and passes the events to the fan-out
/// thread. (Overlapping the append of one batch with the flush of the previous one was tried:
/// sled's flush then also waits for the concurrent appends, and batch ingest fell by half.)
pub(super) fn commit_loop(
    rx: Receiver<Commit>,
    store: &dyn Storage,
    registry: &Registry,
    seq: &Sequencer,
    fanout: Sender<Vec<EventRecord>>,
    fanned: &Mutex<Vec<u64>>,
    lag: &Lag,
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
        let known = known_ids(store, &batch);
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
                    match &known {
                        Ok(known) if known.contains(&key) => {
                            accepted.push(Accepted::Duplicate(p.record.id.clone()));
                            continue;
                        }
                        Ok(_) => {
                            seen.insert(key, p.record.id.clone());
                        }
                        Err(err) => {
                            result = Err(err.clone());
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
        let failed = store.append_events_owing(&fresh, &owed).err();
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
        finish(appended, store, &fanout, fanned, lag);
    }
}

/// The producer-chosen ids of `batch` that their accounts used before: one question to the
/// store per group commit (on PostgreSQL one round trip, not one per event).
fn known_ids(
    store: &dyn Storage,
    batch: &[Commit],
) -> Result<HashSet<(AccountId, EventId)>, StoreError> {
    let asked: Vec<(&AccountId, &EventId)> = batch
        .iter()
        .filter_map(|c| match c {
            Commit::Events { events, .. } => Some(events),
            Commit::Sync { .. } => None,
        })
        .flatten()
        .filter(|p| p.mint.is_none())
        .map(|p| (&p.record.account_id, &p.record.id))
        .collect();
    if asked.is_empty() {
        return Ok(HashSet::new());
    }
    let question: Vec<(&AccountId, &str)> = asked.iter().map(|(a, id)| (*a, id.as_str())).collect();
    let answer = store.events_known(&question)?;
    Ok(asked
        .into_iter()
        .zip(answer)
        .filter(|(_, known)| *known)
        .map(|((a, id), _)| (a.clone(), id.clone()))
        .collect())
}

/// Makes an appended batch durable with one flush, answers its requests, and passes its
/// events to the fan-out thread. Inbox marks of events whose deliveries the fan-out thread had
/// written before the flush started are cleared after it: a crash at any point leaves either
/// the deliveries or the mark.
fn finish(
    a: Appended,
    store: &dyn Storage,
    fanout: &Sender<Vec<EventRecord>>,
    fanned: &Mutex<Vec<u64>>,
    lag: &Lag,
) {
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
    let Some(first) = a.fan_out.first() else {
        return;
    };
    // Owed from here, the wait for room in the fan-out queue included (`crate::pushback`).
    lag.fanout_queued(crate::ids::seq_time_ms(first.seq));
    // A full fan-out queue holds the committer here, which fills the ingest queue, which
    // answers 503: backpressure instead of unbounded memory.
    if fanout.send(a.fan_out).is_err() {
        // Nobody will write (or pop) it: it is owed at the next start, not this engine's lag.
        lag.fanout_written(1);
        tracing::error!("the fan-out thread is gone; fan-out will be re-run at start-up");
    }
}

/// One durable flush; then the inbox marks of `ready` (events whose deliveries were written
/// before it) are cleared. On failure they stay owed.
fn flush_and_clear(
    store: &dyn Storage,
    fanned: &Mutex<Vec<u64>>,
    ready: Vec<u64>,
) -> Result<(), StoreError> {
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
            Err(err)
        }
    }
}
