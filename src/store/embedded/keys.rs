//! Key encodings of every sled tree — the one place they are defined.
//!
//! Integers are big-endian so that byte order is numeric order and range scans come out sorted.
//! Variable-length strings (account and event ids, at most 255 bytes, validated in `ids`) are
//! prefixed with their length so that a prefix scan of one account never runs into another
//! whose id merely starts the same way.
//!
//! | tree          | key                                      | value                  |
//! |---------------|------------------------------------------|------------------------|
//! | `meta`        | name (utf-8)                             | bytes                  |
//! | `accounts`    | account id                               | `Account`              |
//! | `webhooks`    | acc(len u8, bytes) · webhook u64         | `Webhook`              |
//! | `events`      | last seq u64 of the chunk                | chunk of `EventRecord` |
//! | `event_ids`   | acc(len u8, bytes) · event id bytes      | seq u64 (producer ids) |
//! | `inbox`       | seq u64                                  | empty (fan-out owed)   |
//! | `deliveries`  | seq u64 · webhook u64 (= delivery id)    | `DeliveryRecord`       |
//! | `attempts`    | delivery id (16) · attempt number u32    | `AttemptRecord`        |
//! | `by_webhook`  | webhook u64 · delivery id (16)           | empty                  |
//! | `by_account`  | acc(len u8, bytes) · seq u64             | empty                  |
//! | `schedule`    | due unix ms u64 · delivery id (16)       | empty                  |
//! | `stats`       | webhook u64 · unix hour u64              | `stats::Counts`        |
//! | `sessions`    | SHA-256 of the session cookie (32)       | sealed session (text)  |
//!
//! Values are encoded by `codec` (one format-version byte, then bincode). `meta` holds
//! `format_version` (u32 big-endian, see `format`) and the start-up write probe; an `Account`
//! holds the SHA-256 of its API key (there is no key index on disk), a `Webhook` its signing
//! secrets, sealed; an `events` chunk (≤ 64 records, ~6 KiB) is a table of (seq, end offset)
//! and then the records, each with the exact body every attempt sends; a `stats` value is an
//! hour's attempts by outcome and a response-time histogram, written by the delivery writer
//! with each drain and dropped by retention once the hour ends before its cutoff, and with its
//! webhook.
//!
//! `seq` is time-ordered (`unix_ms << 20 | counter`, never decreasing, `ids::Sequencer`), so
//! `deliveries`, `by_webhook` and `by_account` sort by creation time: "newest first" is a
//! reverse range scan, `since` / `until` are range bounds, and retention is a scan from the
//! front of `deliveries`. A delivery id is derived from (event, webhook), which makes fan-out
//! idempotent. The delivery log's status and event filters are applied during the scan (a
//! documented limit: a very selective filter over a huge history scans more keys than it
//! returns).
//!
//! `by_account` names an account's *events* that have deliveries, not each delivery (since
//! format 3; before, one entry per delivery): a delivery id starts with its event's seq and
//! every delivery of an event is its account's, so an account's deliveries are the
//! `deliveries` ranges of those seqs — one index write per event instead of one per delivery
//! on the delivery writer. An entry can outlive its event's deliveries (a webhook deleted):
//! readers skip an empty range; it goes with the event (retention, account deletion).

use crate::ids::{AccountId, DeliveryId, WebhookId};

pub fn account_prefix(account: &AccountId) -> Vec<u8> {
    let bytes = account.as_str().as_bytes();
    let mut key = Vec::with_capacity(1 + bytes.len() + 16);
    key.push(bytes.len() as u8);
    key.extend_from_slice(bytes);
    key
}

pub fn webhook(account: &AccountId, webhook: WebhookId) -> Vec<u8> {
    let mut key = account_prefix(account);
    key.extend_from_slice(&webhook.0.to_be_bytes());
    key
}

pub fn seq(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub fn seq_from(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(..8)?.try_into().ok()?))
}

pub fn event_id(account: &AccountId, event_id: &str) -> Vec<u8> {
    let mut key = account_prefix(account);
    key.extend_from_slice(event_id.as_bytes());
    key
}

pub fn delivery(id: DeliveryId) -> [u8; 16] {
    id.to_bytes()
}

pub fn attempt(id: DeliveryId, number: u32) -> [u8; 20] {
    let mut key = [0u8; 20];
    key[..16].copy_from_slice(&id.to_bytes());
    key[16..].copy_from_slice(&number.to_be_bytes());
    key
}

pub fn by_webhook_prefix(webhook: WebhookId) -> [u8; 8] {
    webhook.0.to_be_bytes()
}

pub fn by_webhook(webhook: WebhookId, id: DeliveryId) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&webhook.0.to_be_bytes());
    key[8..].copy_from_slice(&id.to_bytes());
    key
}

pub fn by_account(account: &AccountId, seq: u64) -> Vec<u8> {
    let mut key = account_prefix(account);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The seq at the end of a `by_account` key.
pub fn by_account_seq(key: &[u8]) -> Option<u64> {
    let start = key.len().checked_sub(8)?;
    Some(u64::from_be_bytes(key[start..].try_into().ok()?))
}

/// The `deliveries` keys of every delivery of event `seq`: `[lo, hi]`.
pub fn deliveries_of_event(seq: u64) -> ([u8; 16], [u8; 16]) {
    let lo = DeliveryId {
        seq,
        webhook: WebhookId(0),
    };
    let hi = DeliveryId {
        seq,
        webhook: WebhookId(u64::MAX),
    };
    (lo.to_bytes(), hi.to_bytes())
}

pub fn schedule(due_ms: u64, id: DeliveryId) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&due_ms.to_be_bytes());
    key[8..].copy_from_slice(&id.to_bytes());
    key
}

/// Splits a `schedule` key into (due ms, delivery id).
pub fn schedule_parts(key: &[u8]) -> Option<(u64, DeliveryId)> {
    Some((seq_from(key)?, DeliveryId::from_bytes(key.get(8..24)?)?))
}

/// A webhook's statistics bucket of one hour (unix ms / 3 600 000).
pub fn stats(webhook: WebhookId, hour: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&webhook.0.to_be_bytes());
    key[8..].copy_from_slice(&hour.to_be_bytes());
    key
}

/// Splits a `stats` key into (webhook, hour).
pub fn stats_parts(key: &[u8]) -> Option<(WebhookId, u64)> {
    Some((WebhookId(seq_from(key)?), seq_from(key.get(8..)?)?))
}

/// The delivery id at the end of a `by_webhook` key (or a format-2 `by_account` key).
pub fn trailing_delivery(key: &[u8]) -> Option<DeliveryId> {
    let start = key.len().checked_sub(16)?;
    DeliveryId::from_bytes(&key[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_prefixes_do_not_overlap() {
        let a = AccountId::parse("acc_1").unwrap();
        let b = AccountId::parse("acc_12").unwrap();
        let ka = webhook(&a, WebhookId(1));
        let kb = webhook(&b, WebhookId(1));
        assert!(!kb.starts_with(&account_prefix(&a)));
        assert!(ka.starts_with(&account_prefix(&a)));
    }

    #[test]
    fn integer_keys_sort_numerically() {
        let id = |s| DeliveryId {
            seq: s,
            webhook: WebhookId(9),
        };
        assert!(schedule(255, id(1)) < schedule(256, id(0)));
        assert!(delivery(id(255)) < delivery(id(256)));
        assert!(attempt(id(1), 255) < attempt(id(1), 256));
        assert_eq!(schedule_parts(&schedule(77, id(5))), Some((77, id(5))));
        assert_eq!(
            trailing_delivery(&by_webhook(WebhookId(3), id(8))),
            Some(id(8))
        );
        let acc = AccountId::parse("acc_x").unwrap();
        assert_eq!(by_account_seq(&by_account(&acc, 8)), Some(8));
        assert!(by_account(&acc, 255) < by_account(&acc, 256));
        let (lo, hi) = deliveries_of_event(8);
        assert!(lo <= delivery(id(8)) && delivery(id(8)) <= hi);
        assert!(hi < delivery(id(9)) && delivery(id(7)) < lo);
    }
}
