//! The contract of [`Storage`], as checks that take any backend through `&dyn Storage`: what
//! the engine relies on, whatever keeps the bytes. Each backend runs every check on a fresh,
//! empty store of its own (the embedded store below; a second backend adds one line to
//! [`backend_conformance!`]'s callers; compiled into the library, hidden, so that the integration tests can run it on a backend that needs their fixtures). The embedded store's own layout (chunks, key
//! encodings, blobs, format migrations) is tested next to it, in `embedded`.

use crate::ids::{AccountId, DeliveryId, EventId, WebhookId};
use crate::model::{
    Account, AttemptRecord, DeliveryRecord, DeliveryStatus, EventRecord, Webhook, WebhookStatus,
};
use crate::stats::{AttemptStat, Outcome};
use crate::store::{purge_before, DeliveryQuery, DeliveryWrites, Purged, Storage};

/// Generates one `#[test]` per check for a backend; `$open` makes a fresh empty store and
/// returns it with whatever must live as long as it (a temporary directory, a database).
#[macro_export]
macro_rules! backend_conformance {
    ($open:expr) => {
        $crate::backend_conformance!(@each $open;
            accounts_and_webhooks_round_trip_and_delete,
            events_are_found_by_seq_and_id_and_owe_fan_out_until_cleared,
            delivery_writes_are_read_back_scheduled_and_listed,
            a_held_delivery_is_read_first_until_released,
            statistics_and_sessions_round_trip,
            retention_drops_what_ended_before_the_cutoff_and_nothing_still_owed,
            whole_days_of_history_go_but_not_one_with_owed_work,
            durability_and_health_answer_on_a_healthy_store);
    };
    (@each $open:expr; $($check:ident),*) => {
        $(
            #[test]
            fn $check() {
                let (_guard, store) = $open();
                $crate::store::conformance::$check(&*store);
            }
        )*
    };
}

const ACCOUNT: &str = "acc_contract";

fn account() -> AccountId {
    AccountId::parse(ACCOUNT).unwrap()
}

fn an_account(id: &AccountId) -> Account {
    Account {
        id: id.clone(),
        name: "Contract".into(),
        plan: "starter".into(),
        created_ms: 1,
        api_key_hash: [7; 32],
    }
}

fn a_webhook(account: &AccountId, id: u64) -> Webhook {
    Webhook {
        id: WebhookId(id),
        account_id: account.clone(),
        name: format!("hook {id}"),
        url: "https://example.com/hook".into(),
        description: None,
        events: vec!["*".into()],
        ip_allowlist: vec![],
        status: WebhookStatus::Active,
        disabled_reason: None,
        consecutive_failures: 0,
        secret: format!("whsec_secret-of-{id}"),
        created_ms: 1,
        updated_ms: 1,
        signature_scheme: Default::default(),
        previous_secret: None,
        rotation_ends_ms: None,
        ordering: Default::default(),
        max_concurrency: None,
    }
}

/// An event at unix ms `ms` (its sequence number says when it was created).
fn an_event(account: &AccountId, ms: u64, n: u64) -> EventRecord {
    let seq = crate::ids::seq_floor(ms) + n;
    EventRecord {
        seq,
        id: EventId::from_seq(seq),
        account_id: account.clone(),
        event: "visitor.checked_in".into(),
        body: format!("{{\"n\":{n}}}").into_bytes(),
    }
}

fn an_attempt(number: u32, code: u16) -> AttemptRecord {
    AttemptRecord {
        number,
        at_ms: 5,
        response_code: Some(code),
        response_time_ms: 3,
        response_headers: vec![("x-seen".into(), "1".into())],
        response_body: "ok".into(),
        error: None,
        timestamp: 5,
        signature: "v1,abc".into(),
    }
}

/// A delivery of `event` to `hook`, settled with one attempt answered `code` (200 ends it
/// delivered, anything else leaves it retrying at `retry_at`).
fn settle(store: &dyn Storage, record: &DeliveryRecord, code: u16, retry_at: u64, now: u64) {
    let mut r = record.clone();
    let old_due = r.next_attempt_ms;
    r.attempt_count += 1;
    r.response_code = Some(code);
    r.updated_ms = now;
    if code == 200 {
        r.status = DeliveryStatus::Delivered;
        r.next_attempt_ms = None;
    } else {
        r.status = DeliveryStatus::Retrying;
        r.next_attempt_ms = Some(retry_at);
    }
    let attempt = an_attempt(r.attempt_count, code);
    store
        .apply_delivery_writes(&DeliveryWrites::settled(r, old_due, attempt))
        .unwrap();
}

pub fn accounts_and_webhooks_round_trip_and_delete(store: &dyn Storage) {
    let a = account();
    let b = AccountId::parse("acc_other").unwrap();
    store.put_account(&an_account(&a)).unwrap();
    store.put_account(&an_account(&b)).unwrap();
    assert_eq!(store.get_account(&a).unwrap(), Some(an_account(&a)));
    assert_eq!(store.all_accounts().unwrap().len(), 2);
    for id in [1, 2] {
        store.put_webhook(&a_webhook(&a, id)).unwrap();
    }
    store.put_webhook(&a_webhook(&b, 3)).unwrap();
    // Secrets come back as they went in (however the backend keeps them).
    let got = store.get_webhook(&a, WebhookId(2)).unwrap().unwrap();
    assert_eq!(got, a_webhook(&a, 2));
    assert_eq!(store.get_webhook(&b, WebhookId(2)).unwrap(), None);
    assert_eq!(store.webhooks_of(&a).unwrap().len(), 2);
    assert_eq!(store.all_webhooks().unwrap().len(), 3);
    let mut edited = a_webhook(&a, 1);
    edited.status = WebhookStatus::Paused;
    store.put_webhook(&edited).unwrap();
    assert_eq!(
        store.get_webhook(&a, WebhookId(1)).unwrap().unwrap().status,
        WebhookStatus::Paused
    );

    // A webhook goes with its deliveries; the count is of those still owed an attempt.
    let e = an_event(&a, 1_000, 1);
    store
        .append_events_owing(std::slice::from_ref(&e), &[false])
        .unwrap();
    let owed = DeliveryRecord::new(
        DeliveryId {
            seq: e.seq,
            webhook: WebhookId(2),
        },
        &e,
        10,
        false,
    );
    store
        .apply_delivery_writes(&DeliveryWrites::created(vec![owed.clone()]))
        .unwrap();
    assert_eq!(store.delete_webhook(&a_webhook(&a, 2)).unwrap(), 1);
    assert_eq!(store.get_webhook(&a, WebhookId(2)).unwrap(), None);
    assert_eq!(store.get_delivery(owed.id).unwrap(), None);
    assert!(store.scheduled().all(|s| s.unwrap().1 != owed.id));

    // An account goes with everything it owns, and nothing of another account.
    let kept = an_event(&b, 1_000, 2);
    store
        .append_events_owing(&[kept.clone(), an_event(&a, 1_000, 3)], &[false, false])
        .unwrap();
    store.delete_account(&an_account(&a)).unwrap();
    assert_eq!(store.get_account(&a).unwrap(), None);
    assert!(store.webhooks_of(&a).unwrap().is_empty());
    assert_eq!(store.get_event(e.seq).unwrap(), None);
    assert_eq!(store.event_seq(&a, e.id.as_str()).unwrap(), None);
    assert_eq!(store.get_event(kept.seq).unwrap(), Some(kept));
    assert_eq!(store.all_webhooks().unwrap().len(), 1);
}

pub fn events_are_found_by_seq_and_id_and_owe_fan_out_until_cleared(store: &dyn Storage) {
    let a = account();
    assert_eq!(store.last_seq().unwrap(), 0);
    let minted = an_event(&a, 2_000, 1);
    let mut chosen = an_event(&a, 2_000, 2);
    chosen.id = EventId::parse("visit-42").unwrap();
    let quiet = an_event(&a, 2_000, 3);
    store
        .append_events_owing(
            &[minted.clone(), chosen.clone(), quiet.clone()],
            &[true, true, false],
        )
        .unwrap();
    store.make_durable().unwrap();
    assert_eq!(store.get_event(chosen.seq).unwrap(), Some(chosen.clone()));
    assert_eq!(store.get_event(quiet.seq + 1).unwrap(), None);
    assert_eq!(store.last_seq().unwrap(), quiet.seq);
    // Idempotency keys: by the engine's minted id and by a producer's own id, per account.
    assert_eq!(
        store.event_seq(&a, minted.id.as_str()).unwrap(),
        Some(minted.seq)
    );
    assert_eq!(store.event_seq(&a, "visit-42").unwrap(), Some(chosen.seq));
    let other = AccountId::parse("acc_other").unwrap();
    assert_eq!(store.event_seq(&other, "visit-42").unwrap(), None);
    // The same asked for a whole batch at once, in order, repeats and all.
    assert_eq!(
        store
            .events_known(&[
                (&a, "visit-41"),
                (&a, "visit-42"),
                (&other, "visit-42"),
                (&a, minted.id.as_str()),
                (&a, "visit-42"),
            ])
            .unwrap(),
        vec![false, true, false, true, true]
    );
    assert!(store.events_known(&[]).unwrap().is_empty());
    // Only events that owe a fan-out are in the inbox, until their deliveries are written.
    assert_eq!(store.inbox().unwrap(), vec![minted.seq, chosen.seq]);
    store.clear_inbox(&[minted.seq]).unwrap();
    assert_eq!(store.inbox().unwrap(), vec![chosen.seq]);
    // `append_events` owes every event its fan-out.
    let more = an_event(&a, 2_001, 1);
    store.append_events(std::slice::from_ref(&more)).unwrap();
    assert_eq!(store.inbox().unwrap(), vec![chosen.seq, more.seq]);
}

pub fn delivery_writes_are_read_back_scheduled_and_listed(store: &dyn Storage) {
    let a = account();
    store.put_account(&an_account(&a)).unwrap();
    let events: Vec<EventRecord> = (1..=3).map(|n| an_event(&a, 3_000, n)).collect();
    store.append_events_owing(&events, &[false; 3]).unwrap();
    let records: Vec<DeliveryRecord> = events
        .iter()
        .flat_map(|e| {
            [1, 2].map(|wh| {
                DeliveryRecord::new(
                    DeliveryId {
                        seq: e.seq,
                        webhook: WebhookId(wh),
                    },
                    e,
                    100 + wh,
                    false,
                )
            })
        })
        .collect();
    store
        .apply_delivery_writes(&DeliveryWrites::created(records.clone()))
        .unwrap();
    for r in &records {
        assert_eq!(store.get_delivery(r.id).unwrap().as_ref(), Some(r));
    }
    // Every owed attempt is scheduled, in due order.
    let due: Vec<(u64, DeliveryId)> = store.scheduled().map(Result::unwrap).collect();
    assert_eq!(due.len(), 6);
    assert!(due.windows(2).all(|w| w[0].0 <= w[1].0), "{due:?}");
    assert_eq!(store.earliest_due_ms().unwrap(), Some(101));

    // An outcome moves the schedule entry (or removes it) and adds the attempt.
    settle(store, &records[0], 200, 0, 200);
    settle(store, &records[1], 503, 9_000, 200);
    let delivered = store.get_delivery(records[0].id).unwrap().unwrap();
    assert_eq!(delivered.status, DeliveryStatus::Delivered);
    assert_eq!(
        store.attempts(records[0].id).unwrap(),
        vec![an_attempt(1, 200)]
    );
    let due: Vec<(u64, DeliveryId)> = store.scheduled().map(Result::unwrap).collect();
    assert_eq!(due.len(), 5);
    assert!(!due.iter().any(|(_, id)| *id == records[0].id));
    assert_eq!(due.last(), Some(&(9_000, records[1].id)));

    // The log: newest first, paged, filtered by webhook and status.
    let q = |webhook, status, cursor, limit| DeliveryQuery {
        webhook,
        status,
        cursor,
        limit,
        ..Default::default()
    };
    let page = store.list_deliveries(&a, &q(None, None, None, 4)).unwrap();
    assert_eq!(page.items.len(), 4);
    assert_eq!(page.items[0].id.seq, events[2].seq);
    let rest = store
        .list_deliveries(&a, &q(None, None, page.next_cursor, 4))
        .unwrap();
    assert_eq!(rest.items.len(), 2);
    assert!(rest.next_cursor.is_none());
    let mut seen: Vec<DeliveryId> = page.items.iter().chain(&rest.items).map(|r| r.id).collect();
    seen.sort_by_key(|id| id.to_bytes());
    seen.dedup();
    assert_eq!(seen.len(), 6, "a page repeated or skipped a delivery");
    let one = store
        .list_deliveries(&a, &q(Some(WebhookId(2)), None, None, 10))
        .unwrap();
    assert_eq!(one.items.len(), 3);
    assert!(one.items.iter().all(|r| r.id.webhook == WebhookId(2)));
    let retrying = store
        .list_deliveries(&a, &q(None, Some(DeliveryStatus::Retrying), None, 10))
        .unwrap();
    assert_eq!(
        retrying.items.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![records[1].id]
    );
    let other = AccountId::parse("acc_other").unwrap();
    assert!(store
        .list_deliveries(&other, &q(None, None, None, 10))
        .unwrap()
        .items
        .is_empty());

    // A webhook's deliveries, oldest first, as the caller selects them.
    let open = store
        .webhook_deliveries(WebhookId(1), &|r: &DeliveryRecord| r.status.is_open())
        .unwrap();
    assert_eq!(
        open.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![records[2].id, records[4].id]
    );
}

pub fn a_held_delivery_is_read_first_until_released(store: &dyn Storage) {
    let a = account();
    let e = an_event(&a, 4_000, 1);
    store
        .append_events_owing(std::slice::from_ref(&e), &[false])
        .unwrap();
    let r = DeliveryRecord::new(
        DeliveryId {
            seq: e.seq,
            webhook: WebhookId(5),
        },
        &e,
        10,
        false,
    );
    assert!(!store.is_held(r.id));
    store.hold_delivery(r.clone());
    assert!(store.is_held(r.id));
    assert_eq!(store.get_delivery(r.id).unwrap().as_ref(), Some(&r));
    assert_eq!(store.held_delivery(r.id).as_ref(), Some(&r));
    let found = store
        .webhook_deliveries(WebhookId(5), &|_: &DeliveryRecord| true)
        .unwrap();
    assert_eq!(found, vec![r.clone()]);
    // Written, then released: read from storage, once.
    store
        .apply_delivery_writes(&DeliveryWrites::created(vec![r.clone()]))
        .unwrap();
    assert_eq!(store.release_held(r.id), Some(r.clone()));
    assert!(!store.is_held(r.id));
    assert_eq!(store.get_delivery(r.id).unwrap(), Some(r.clone()));
    let found = store
        .webhook_deliveries(WebhookId(5), &|_: &DeliveryRecord| true)
        .unwrap();
    assert_eq!(found, vec![r]);
}

pub fn statistics_and_sessions_round_trip(store: &dyn Storage) {
    let hour_ms = 3_600_000;
    let stat = |hour: u64, outcome| AttemptStat {
        webhook: WebhookId(9),
        at_ms: hour * hour_ms + 5,
        outcome,
        response_time_ms: 12,
    };
    store
        .add_stats(&[stat(10, Outcome::Delivered), stat(10, Outcome::Retrying)])
        .unwrap();
    store
        .add_stats(&[stat(10, Outcome::Delivered), stat(12, Outcome::Failed)])
        .unwrap();
    let hours = store.webhook_stats(WebhookId(9), 10).unwrap();
    let summary: Vec<(u64, u64, u64, u64)> = hours
        .iter()
        .map(|(h, c)| (*h, c.delivered, c.retrying, c.failed))
        .collect();
    assert_eq!(summary, vec![(10, 2, 1, 0), (12, 0, 0, 1)]);
    assert_eq!(store.webhook_stats(WebhookId(9), 11).unwrap().len(), 1);
    assert!(store.webhook_stats(WebhookId(8), 0).unwrap().is_empty());

    store.put_session(&[1; 32], "session one").unwrap();
    store.put_session(&[2; 32], "session two").unwrap();
    let mut sessions = store.sessions().unwrap();
    sessions.sort();
    assert_eq!(
        sessions,
        vec![
            ([1; 32], "session one".to_string()),
            ([2; 32], "session two".to_string())
        ]
    );
    store.remove_session(&[1; 32]).unwrap();
    assert_eq!(
        store.sessions().unwrap(),
        vec![([2; 32], "session two".to_string())]
    );
}

pub fn retention_drops_what_ended_before_the_cutoff_and_nothing_still_owed(store: &dyn Storage) {
    let a = account();
    let old: Vec<EventRecord> = (1..=4).map(|n| an_event(&a, 5_000, n)).collect();
    let owed_fan_out = an_event(&a, 5_000, 9);
    let young = an_event(&a, 90_000, 1);
    let mut all = old.clone();
    all.push(owed_fan_out.clone());
    store
        .append_events_owing(&all, &[false, false, false, false, true])
        .unwrap();
    // Appended later (a backend may drop events by the batch they were appended in).
    store
        .append_events_owing(std::slice::from_ref(&young), &[false])
        .unwrap();
    let delivery = |e: &EventRecord| {
        DeliveryRecord::new(
            DeliveryId {
                seq: e.seq,
                webhook: WebhookId(1),
            },
            e,
            10,
            false,
        )
    };
    let records: Vec<DeliveryRecord> = old.iter().chain([&young]).map(delivery).collect();
    store
        .apply_delivery_writes(&DeliveryWrites::created(records.clone()))
        .unwrap();
    // Old and ended: 0 and 1. Old but still owed an attempt: 2. Old, ended after the
    // cutoff (retried by hand since): 3. Young: 4.
    settle(store, &records[0], 200, 0, 6_000);
    settle(store, &records[1], 200, 0, 6_000);
    settle(store, &records[2], 500, 99_000, 6_000);
    settle(store, &records[3], 200, 0, 80_000);
    settle(store, &records[4], 200, 0, 95_000);
    let cutoff = 50_000;
    let purged = purge_before(store, cutoff, &|| true).unwrap();
    assert_eq!(
        purged,
        Purged {
            deliveries: 2,
            attempts: 2,
            events: 2
        }
    );
    for gone in &records[..2] {
        assert_eq!(store.get_delivery(gone.id).unwrap(), None);
        assert!(store.attempts(gone.id).unwrap().is_empty());
        assert_eq!(store.get_event(gone.id.seq).unwrap(), None);
    }
    for kept in &records[2..] {
        assert!(
            store.get_delivery(kept.id).unwrap().is_some(),
            "{:?} purged",
            kept.id
        );
        assert!(store.get_event(kept.id.seq).unwrap().is_some());
    }
    // An event still owed its fan-out is kept however old.
    assert!(store.get_event(owed_fan_out.seq).unwrap().is_some());
    // A second pass finds nothing more.
    assert_eq!(
        purge_before(store, cutoff, &|| true).unwrap(),
        Purged::default()
    );
}

/// The first UTC day of [`whole_days_of_history_go_but_not_one_with_owed_work`]'s two: 20 days
/// before now, so a backend that keeps history in day tables has tables for them only if a test
/// made them (`tests/it/pg_store.rs` does).
pub fn old_day() -> u64 {
    crate::clock::now_ms() / 86_400_000 - 20
}

/// Two old days of history: the first all ended, the second with one delivery still owed an
/// attempt. A pass past both removes the first whole and only what ended of the second (a
/// backend may drop the first as a unit: the PostgreSQL store drops its day tables).
pub fn whole_days_of_history_go_but_not_one_with_owed_work(store: &dyn Storage) {
    let a = account();
    let (first, second) = (old_day() * 86_400_000, (old_day() + 1) * 86_400_000);
    let events: Vec<EventRecord> = (1..=3)
        .map(|n| an_event(&a, first + 1_000, n))
        .chain((1..=2).map(|n| an_event(&a, second + 1_000, n)))
        .collect();
    store.append_events_owing(&events, &[false; 5]).unwrap();
    let records: Vec<DeliveryRecord> = events
        .iter()
        .map(|e| {
            DeliveryRecord::new(
                DeliveryId {
                    seq: e.seq,
                    webhook: WebhookId(1),
                },
                e,
                first,
                false,
            )
        })
        .collect();
    store
        .apply_delivery_writes(&DeliveryWrites::created(records.clone()))
        .unwrap();
    for r in &records[..4] {
        settle(store, r, 200, 0, second + 2_000);
    }
    // Owed an attempt for a long time yet (a long retry schedule).
    settle(
        store,
        &records[4],
        500,
        second + 400 * 86_400_000,
        second + 2_000,
    );
    let cutoff = second + 3 * 86_400_000;
    let purged = purge_before(store, cutoff, &|| true).unwrap();
    assert_eq!(
        purged,
        Purged {
            deliveries: 4,
            attempts: 4,
            events: 4
        }
    );
    for gone in &records[..4] {
        assert_eq!(store.get_delivery(gone.id).unwrap(), None);
        assert!(store.attempts(gone.id).unwrap().is_empty());
        assert_eq!(store.get_event(gone.id.seq).unwrap(), None);
    }
    let kept = &records[4];
    assert_eq!(
        store.get_delivery(kept.id).unwrap().map(|r| r.status),
        Some(DeliveryStatus::Retrying)
    );
    assert_eq!(store.attempts(kept.id).unwrap().len(), 1);
    assert!(store.get_event(kept.id.seq).unwrap().is_some());
    let page = store
        .list_deliveries(
            &a,
            &DeliveryQuery {
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(
        store
            .scheduled()
            .collect::<crate::store::Result<Vec<_>>>()
            .unwrap(),
        vec![(second + 400 * 86_400_000, kept.id)]
    );
    assert_eq!(
        purge_before(store, cutoff, &|| true).unwrap(),
        Purged::default()
    );
}

pub fn durability_and_health_answer_on_a_healthy_store(store: &dyn Storage) {
    store.health().unwrap();
    store.probe_write().unwrap();
    store.put_account(&an_account(&account())).unwrap();
    store.make_durable().unwrap();
    store.health().unwrap();
}

/// The embedded store keeps the contract (the PostgreSQL store's run is in `tests/it/pg_store.rs`,
/// next to the test cluster).
#[cfg(test)]
mod embedded {
    use std::sync::Arc;

    use crate::store::embedded::SledStore;
    use crate::store::Storage;

    fn open() -> (tempfile::TempDir, Arc<dyn Storage>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), true).unwrap();
        (dir, Arc::new(store))
    }

    crate::backend_conformance!(open);
}
